"""Nothing a user feeds sgl may crash it, hang it, or lose a record: every input item yields exactly one strict-JSON
record, in order; no input, signal or second process can lose or duplicate one."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from tests.conftest import make_images, write_preset

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def strict_records(path: Path) -> list[dict]:
    """Every line of an output file, parsed by a strict reader (no NaN or Infinity, no lone surrogates)."""

    def refuse(name):
        raise AssertionError(f"{name} in strict JSON output")

    out = []
    for raw in path.read_bytes().split(b"\n")[:-1]:
        text = raw.decode("utf-8")  # strict: a lone surrogate cannot be encoded, so it would not be here
        out.append(json.loads(text, parse_constant=refuse))
    assert path.read_bytes().endswith(b"\n")
    return out


def _good(image: str, q: str = "What is red?") -> str:
    return json.dumps({"image": image, "question": q})


def fuzz_lines(image: str) -> list[tuple[bytes, str | None]]:
    """(line bytes, the error it must give or None for an answered item). Blank lines give no record."""
    good = _good(image).encode()
    return [
        (b"\xef\xbb\xbf" + good, None),  # a UTF-8 BOM on line 1
        (b"[" * 10000 + b"]" * 10000, "not valid JSON: nested too deeply"),
        (b'{"image": "x.png", "question": "q", "id": ' + b"9" * 5000 + b"}", "an integer with too many digits"),
        (b'{"image": "x.png", "question": "q", "id": "\\ud800"}', "field 'id' holds a lone surrogate"),
        (b'{"image": "x.png", "question": "q", "answer": "\\udfff"}', "field 'answer' holds a lone surrogate"),
        (b'{"image": "x.png", "question": "what \\ud800 is it"}', "field 'question' holds a lone surrogate"),
        (b'{"image": "x.png", "question": "q", "answer": NaN}', "NaN is not JSON"),
        (b'{"image": "x.png", "question": "q", "answer": -Infinity}', "-Infinity is not JSON"),
        (b"\xff\xfe not utf8", "not UTF-8 (byte 0xff at column 1)"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"question": "q"}', "missing field 'image'"),
        (b'{"image": 3, "question": "q"}', "field 'image' must be a non-empty string, got 3"),
        (b'{"images": [], "question": "q"}', "field 'images' must be a non-empty list"),
        (b'{"image": "a.png", "images": ["a.png"], "question": "q"}', "give one of 'image', 'images' and"),
        (b'{"image": "x.png", "question": "q", "max_new_tokens": true}', "field 'max_new_tokens' must be a positive"),
        (b"", None),  # blank: no record
        (b"   \t", None),
        # A raw CR inside a line is a JSON error of that one line (it does not split it in two).
        (json.dumps({"image": image, "question": "what\ris this"}).replace("\\r", "\r").encode(),
         "Invalid control character"),
        (good + b"\r", "ANSWERED"),  # CRLF
        (b'{"image_base64": "not base64!!", "question": "q"}', "is not valid base64"),
        (b'{"image": "data:text/plain;base64,aGk=", "question": "q"}', "is text/plain, not an image"),
        (b'{"image": "ftp://example.com/x.png", "question": "q"}',
         "image 'ftp://example.com/x.png': ftp:// URLs are not supported (sgl reads files"),
        (b'{"image_base64": "aGVsbG8gd29ybGQh", "question": "q"}',
         "image 'inline base64' cannot be read: its 12 bytes are not an image in a format sgl reads (they begin "
         "with text 'hello world!')"),
        (b'{"image_base64": "AAECAwQFBgcICQoL", "question": "q"}',
         "its 12 bytes are not an image in a format sgl reads (they begin with bytes 00 01 02 03 04 05 06 07)"),
        (good, "ANSWERED"),
        # Nesting json.loads accepts but a recursive walk of the value does not survive (issue 24): answered.
        (good[:-1] + b', "x": ' + b"[" * 300 + b"]" * 300 + b"}", "ANSWERED"),
        (good[:-1] + b', "x": {"y": ' + b"[{}, " * 600 + b"0" + b"]" * 600 + b"}}", "ANSWERED"),
        (b'{"image": "x.png", "question": ' + b"[" * 700 + b"]" * 700 + b"}",
         "field 'question' must be a non-empty string, got [[["),
        # json's own message ends in "at": the column is named once.
        (b'{"image": "x.png", "question": "q\x01"}', "(Invalid control character at column 34)"),
        (b'{"image": "x.png", "question": "q', "(Unterminated string starting at column 32)"),
    ]


def test_fuzzed_lines_give_one_strict_record_each_in_order(tmp_path, preset_file):
    (img,) = make_images(tmp_path, sizes=((56, 56),))
    lines = fuzz_lines(img.name)
    src = tmp_path / "fuzz.jsonl"
    src.write_bytes(b"\n".join(raw for raw, _ in lines) + b"\n")
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q"])
    assert res.exit_code == 1, res.output  # some items failed; the run went on
    recs = strict_records(out)
    expected = [(n, want) for n, (raw, want) in enumerate(lines, start=1) if raw.strip()]
    assert [r["line"] for r in recs] == [n for n, _ in expected]  # a bare CR did not split a line
    for rec, (n, want) in zip(recs, expected):
        if want in (None, "ANSWERED"):
            assert rec["error"] is None and isinstance(rec["answer"], str), rec
        else:
            assert rec["error"].startswith(f"line {n}: ") and want in rec["error"], (want, rec["error"])
            assert len(rec["error"]) < 300


def test_a_question_longer_than_the_context_fails_before_model_work(tmp_path, preset_file, monkeypatch):
    from sgl_cli.engine.backends import transformers as hf_backend

    calls = []
    real = hf_backend.greedy
    monkeypatch.setattr(hf_backend, "greedy", lambda *a, **k: calls.append(1) or real(*a, **k))  # both models
    (img,) = make_images(tmp_path, sizes=((56, 56),))
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"image": img.name, "question": "what is " * 25000}) + "\n" + _good(img.name) + "\n")
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q", "--no-exit"])
    assert res.exit_code == 1
    long, short = strict_records(out)
    assert "over the models' context of 4,096 tokens" in long["error"] and long["error"].startswith("line 1: ")
    assert short["error"] is None
    assert len(calls) == 2  # the short item's small and large generations; none for the long one
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "--overwrite",
                              "-q", "--max-prompt-tokens", "100"])
    assert "over max_prompt_tokens 100" in strict_records(out)[0]["error"]


@pytest.mark.parametrize("depth", [300, 500, 700, 900, 989, 990, 1000])
def test_deep_nesting_gives_one_record_per_line_jsonl_and_openai(tmp_path, preset_file, depth):
    """Issue 24: nesting json.loads accepts (up to ~990 levels) killed the run in a recursive walk; each line must
    give its record (answered, or an error naming the line), and an OpenAI run must resume from its output."""
    (img,) = make_images(tmp_path, sizes=((56, 56),))
    deep = "[" * depth + "]" * depth
    src = tmp_path / "deep.jsonl"
    src.write_text("\n".join([_good(img.name), _good(img.name)[:-1] + f', "x": {deep}}}', _good(img.name)]) + "\n")
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q"])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    recs = strict_records(out)
    assert [r["line"] for r in recs] == [1, 2, 3]
    assert recs[0]["error"] is None and recs[2]["error"] is None
    assert recs[1]["error"] in (None, "line 2: not valid JSON: nested too deeply")
    if depth <= 700:
        assert recs[1]["error"] is None and recs[1]["answer"] == recs[0]["answer"]
    request = {"custom_id": "r", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": img.name}},
                                     {"type": "text", "text": "What is red?"}]}]}}
    lines = [json.dumps({**request, "custom_id": f"r{i}"}) for i in range(3)]
    lines[1] = lines[1][:-1] + f', "x": {deep}}}'  # an unknown top-level field, nested deep
    lines.insert(2, json.dumps({**request, "custom_id": "r9", "body": {**request["body"], "metadata": {}}})[:-3]
                 + f'"k": {deep}}}}}}}')  # deep inside body.metadata, which sgl accepts and ignores
    src = tmp_path / "deep-requests.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q"])
    recs = strict_records(out)
    ids = [r["custom_id"] for r in recs]
    for n, (got, own) in enumerate(zip(ids, ["r0", "r1", "r9", "r2"]), start=1):
        # Too deep for json.loads at this stack depth: an error line, named by its line.
        assert got == own or (got == f"sgl-line-{n}" and recs[n - 1]["error"]["message"]
                              == f"line {n}: not valid JSON: nested too deeply"), recs[n - 1]
    if depth <= 700:
        assert ids == ["r0", "r1", "r9", "r2"] and recs[1]["error"] is None and recs[2]["error"] is None
        assert recs[2]["response"]["status_code"] == 200
    whole = out.read_text().splitlines(keepends=True)
    out.write_text("".join(whole[:3]))  # interrupted after the deep lines: resume from sgl's own output
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q", "--resume"])
    assert "refusing to resume" not in res.output
    assert out.read_text().splitlines(keepends=True)[:3] == whole[:3] and [r["custom_id"] for r in
                                                                          strict_records(out)] == ids


def test_no_tokenizer_call_sees_a_huge_question_whole(tmp_path, preset_file, monkeypatch):
    """Issue 24: a question just under the 64 MiB line cap was tokenized whole before the context check (60 MiB:
    59 s, 8.1 GB). Only a prefix bounded by the context may be tokenized, and the record still says why."""
    from transformers import PreTrainedTokenizerBase

    from sgl_cli.engine.core import limits

    seen = []
    real = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *a, **k):
        texts = [text] if isinstance(text, str) else list(text or [])
        seen.append(max((len(t) for t in texts), default=0))
        return real(self, text, *a, **k)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    (img,) = make_images(tmp_path, sizes=((56, 56),))
    words = "what is the color of the square " * (8 << 20 >> 5)  # 8 MiB
    runs = "a" * (8 << 20)
    src = tmp_path / "huge.jsonl"
    src.write_text("\n".join([json.dumps({"image": img.name, "question": words}),
                              json.dumps({"image": img.name, "question": runs}), _good(img.name)]) + "\n")
    del words, runs
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q"])
    assert res.exit_code == 1, res.output
    words_rec, runs_rec, short = strict_records(out)
    budget = 4096 - 5  # the context less the preset's max_new_tokens
    for n, rec in enumerate((words_rec, runs_rec), start=1):
        assert rec["error"].startswith(f"line {n}: the prompt is over ") and \
            f"(counted in the first {limits.PREFIX_CHARS * budget:,} of its 8,388,6" in rec["error"]
        assert rec["error"].endswith("with up to 5 answer tokens that is over the models' context of 4,096 tokens")
    assert short["error"] is None
    assert seen and max(seen) <= limits.PREFIX_CHARS * budget + 1000  # never the 8 MiB text
    # Text whose counted prefix fits (a tokenizer of long tokens; here: a prefix of one character a token) is
    # refused untokenized past MAX_CHARS characters a token; and max_prompt_tokens is the budget when smaller.
    monkeypatch.setattr(limits, "PREFIX_CHARS", 1)
    monkeypatch.setattr(limits, "MAX_CHARS", 2)
    src.write_text(json.dumps({"image": img.name, "question": "b" * 900}) + "\n" + _good(img.name) + "\n")
    seen.clear()
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q", "--overwrite",
                              "--max-prompt-tokens", "300"])
    long, short = strict_records(out)
    assert long["error"] == ("line 1: the prompt's text is 922 characters, over 2 a token of the 300 it may take "
                             "(refused without tokenizing it); over max_prompt_tokens 300")
    assert short["error"] is None and max(seen) < 900


def test_an_image_that_is_a_fifo_is_refused_not_waited_on(tmp_path, preset_file):
    os.mkfifo(tmp_path / "f.png")
    src = tmp_path / "f.jsonl"
    src.write_text(_good("f.png") + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "sgl_cli", "run", str(src), "--preset", str(preset_file), "--out",
                           str(out), "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    (rec,) = strict_records(out)
    assert rec["error"] == ("line 1: image 'f.png' is not a regular file (a pipe, device or socket) "
                            f"({tmp_path / 'f.png'})")


def test_out_equal_to_the_input_is_refused_also_through_a_link(tmp_path, batch, preset_file):
    link = tmp_path / "link.jsonl"
    link.symlink_to(batch)
    before = batch.read_bytes()
    for out in (batch, link):
        res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out), "--overwrite"])
        assert res.exit_code == 2 and "is the input file itself" in res.stderr
    assert batch.read_bytes() == before


@pytest.mark.parametrize("case", ["missing folder", "folder", "read-only"])
def test_bad_out_paths_fail_before_any_model_loads(tmp_path, batch, preset_file, monkeypatch, case):
    from sgl_cli.engine.backends import transformers as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    out = {"missing folder": tmp_path / "nope" / "o.jsonl", "folder": tmp_path, "read-only": tmp_path / "o.jsonl"}[case]
    if case == "read-only":
        real_open = os.open

        def refuse(path, *a, **k):
            if str(path).endswith(".lock"):
                raise OSError(errno.EROFS, "Read-only file system")
            return real_open(path, *a, **k)

        monkeypatch.setattr(os, "open", refuse)
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out)])
    assert res.exit_code == 2
    want = {"missing folder": f"folder {tmp_path / 'nope'} does not exist", "folder": "is a folder; give the output",
            "read-only": f"cannot write in {tmp_path} (Read-only file system)"}[case]
    assert want in res.stderr and res.stderr.count("\n") == 1 and "--resume" not in res.stderr


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path, batch, preset_file):
    out = tmp_path / "out.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from sgl_cli.engine.io.output import OutputLock
        lock = OutputLock(Path({str(out)!r})).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out)])
        assert res.exit_code == 2
        assert f"{out} is being written by another sgl run (pid {holder.pid} on " in res.stderr
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The lock died with its process: the next run goes ahead.
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output and len(strict_records(out)) == 3


def test_two_concurrent_runs_never_splice_an_output(tmp_path, batch, preset_file):
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "sgl_cli", "run", str(batch), "--preset", str(preset_file), "--out", str(out), "-q"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    # Refused at once while the first holds the output (or, had it already finished, because the output exists).
    assert "is being written by another sgl run" in refused or "exists; pass --resume" in refused, refused
    assert [r["line"] for r in strict_records(out)] == [1, 2, 3]


@pytest.mark.parametrize("holder_resumes", [False, True], ids=["fresh", "resumed"])
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_link_to_the_output_is_refused_while_a_run_writes_it(tmp_path, batch, preset_file, link, holder_resumes):
    """Two processes: one writes out.jsonl (a fresh run, or a resumed one), the other is given a link to it. The
    second is refused at once, in one line, whichever name it used; the output keeps one record per line."""
    out = tmp_path / "out.jsonl"
    if holder_resumes:  # one record of three, as an interrupted run left it
        res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out), "-q"])
        assert res.exit_code == 0
        out.write_text(out.read_text().splitlines(keepends=True)[0])
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from sgl_cli.engine import Run, load_preset
        run = Run({str(batch)!r}, load_preset({str(preset_file)!r}), out={str(out)!r}, resume={holder_resumes})
        for record in run:
            print("written", record["line"], flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().split()[0] == "written"
        other = tmp_path / "l.jsonl"
        other.symlink_to(out) if link == "symlink" else os.link(out, other)
        before = out.read_bytes()
        res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(other), "--resume"])
        assert res.exit_code == 2, res.output
        assert f"sgl: error: {other} is being written by another sgl run" in res.stderr
        assert res.stderr.count("\n") == 1
        if link == "symlink":  # the lock file is found through the link: it names the holder
            assert f"(pid {holder.pid} on " in res.stderr
        assert out.read_bytes() == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(other), "--resume", "-q"])
    assert res.exit_code == 0, res.output
    assert [r["line"] for r in strict_records(out)] == [1, 2, 3]


def test_a_full_disk_at_the_lock_is_one_line_and_leaves_no_lock(tmp_path, batch, preset_file, monkeypatch):
    from sgl_cli.engine.backends import transformers as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out)])
    monkeypatch.undo()
    assert res.exit_code == 2, res.output
    assert res.stderr == f"sgl: error: cannot write in {tmp_path} (No space left on device)\n"
    assert not (tmp_path / ".out.jsonl.lock").exists() and not out.exists()


@pytest.mark.parametrize("case", ["preset folder", "preset read-only", "run.json folder", "scores folder",
                                  "preset fifo"])
def test_every_file_a_run_writes_is_checked_before_any_model_loads(tmp_path, batch, preset_file, monkeypatch,
                                                                     case):
    from sgl_cli.engine.backends import transformers as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    out = tmp_path / "out.jsonl"
    path = tmp_path / {"preset": "out.preset.yaml", "run.json": "out.run.json", "scores": "out.scores.arrow"}[
        case.split()[0]]
    if case.endswith("folder"):
        path.mkdir()
        why = "it is a folder; move it away or write to another --out"
    elif case.endswith("fifo"):
        os.mkfifo(path)
        why = "it is not a regular file; move it away or write to another --out"
    else:
        path.write_text("x")
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == path else real_access(p, mode, **k))
        why = "it is not writable"
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out),
                              *(["--save-scores"] if case.startswith("scores") else [])])
    assert res.exit_code == 2, res.output
    assert res.stderr == f"sgl: error: cannot write {path}: {why}\n"
    assert not out.exists() and not (tmp_path / ".out.jsonl.lock").exists()


def test_a_torn_record_is_cut_off_in_place(tmp_path):
    from sgl_cli.engine.io.output import scan_output

    out = tmp_path / "o.jsonl"
    whole = "".join(json.dumps({"line": n, "error": None}) + "\n" for n in range(1, 6))
    out.write_text(whole + '{"line": 6, "err')
    inode = out.stat().st_ino
    assert scan_output(out) == [1, 2, 3, 4, 5]
    assert out.read_text() == whole and out.stat().st_ino == inode  # the same file, truncated, not rewritten
    out.write_text(whole + json.dumps({"line": 6, "error": None}))  # whole, only its newline lost
    assert scan_output(out) == [1, 2, 3, 4, 5, 6] and out.read_text().endswith("}\n")


def test_a_kill_during_repair_never_loses_a_record(tmp_path):
    """A large output with a torn tail, repaired by a process killed at random moments: every whole record is
    always still there."""
    out = tmp_path / "big.jsonl"
    n = 200_000
    out.write_text("".join(json.dumps({"line": i, "error": None, "answer": "x" * 40}) + "\n"
                           for i in range(1, n + 1)) + '{"line": ')
    script = ("from pathlib import Path; from sgl_cli.engine.io.output import scan_output; "
              f"scan_output(Path({str(out)!r}))")
    for delay in (0.05, 0.2, 0.4, 0.8, 1.5, 3.0):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = out.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        assert whole.count(b"\n") == n and whole.startswith(b'{"line": 1,')
    from sgl_cli.engine.io.output import scan_output

    assert len(scan_output(out)) == n and out.read_bytes().endswith(b"\n")


def test_a_full_disk_stops_cleanly_and_resume_completes(tmp_path, batch, preset_file, monkeypatch):
    """The disk fills while the second record is written: the run stops with one line, the first record is whole,
    the torn second is cut off by --resume, which completes the file without duplicates."""
    from sgl_cli.engine.io.output import RecordWriter

    class FillsUp:
        def __init__(self, f, room: int):
            self.f, self.room = f, room

        def write(self, text):
            if self.room == 0:
                self.f.write(text[:20])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= 1
            return self.f.write(text)

        def flush(self):
            self.f.flush()

        def close(self):
            self.f.close()

    real_init = RecordWriter.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self._f = FillsUp(self._f, room=1)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(RecordWriter, "__init__", init)
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out)])
    assert res.exit_code == 2 and res.stderr.splitlines()[-1].startswith("sgl: error: cannot write to")
    assert (f"cannot write to {out}: No space left on device; the 1 record(s) written by this run are whole and kept"
            in res.stderr and "--resume" in res.stderr)
    monkeypatch.setattr(RecordWriter, "__init__", real_init)
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out), "--resume", "-q"])
    assert res.exit_code == 0, res.output
    assert [r["line"] for r in strict_records(out)] == [1, 2, 3]


def test_the_writer_turns_a_full_disk_into_one_line(tmp_path):
    """The real path: a write that fails with ENOSPC (/dev/full) is an OutputError naming the file and --resume."""
    from sgl_cli.engine.io.output import OutputError, RecordWriter

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    writer = RecordWriter(Path("/dev/full"), append=True)
    with pytest.raises(OutputError, match=r"cannot write to /dev/full: No space left on device; the 0 record\(s\)"):
        writer.write({"line": 1})
    writer.close()


def test_the_interrupt_hint_is_the_exact_command_that_continues(tmp_path, batch, preset_file, monkeypatch):
    from sgl_cli.engine.pipeline import engine as engine_mod

    out = tmp_path / "answers.jsonl"
    real = engine_mod.Engine.small_pass  # each batch's, on either pipeline
    calls = {"n": 0}

    def interrupted(self, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, items)

    monkeypatch.setattr(engine_mod.Engine, "small_pass", interrupted)
    args = ["run", str(batch), "--preset", str(preset_file), "--out", str(out), "--retain", "0.5", "--no-exit",
            "--overwrite"]
    res = runner.invoke(app, args)
    assert res.exit_code == 130
    hint = res.stderr.split("`")[1]
    assert hint == (f"sgl run {batch} --out {out} --preset {preset_file} --retain 0.5 --no-exit --resume")
    monkeypatch.setattr(engine_mod.Engine, "small_pass", real)
    res = runner.invoke(app, hint.split()[1:])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args[:-1], "--out", str(tmp_path / "whole.jsonl")])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "ms"} for r in rs]  # noqa: E731
    assert strip(strict_records(out)) == strip(strict_records(tmp_path / "whole.jsonl"))


def test_resume_refuses_an_input_edited_since(tmp_path, batch, preset_file):
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out), "-q"])
    assert res.exit_code == 0
    lines = batch.read_text().splitlines()
    batch.write_text("\n".join(["", *lines]) + "\n")  # every item moved down a line
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "the input changed since the interrupted run" in res.stderr


# -- image URLs against hostile servers ---------------------------------------------------------------------
@pytest.fixture
def hostile_server():
    """A loopback server (127.0.0.1 only) that trickles one byte every 0.2 s: in the body (/body), in the headers
    (/headers), in chunks (/chunked); that redirects to itself (/loop) or to ftp (/ftp). Each trickle ends by
    itself after 8 s, and the server stops with the test."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def trickle(self, pieces):
            try:
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass  # the client gave up: expected
            self.close_connection = True

        def do_GET(self):  # noqa: N802
            if self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path == "/ftp":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/x.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path == "/headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                return self.trickle([b"a"] * 40)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if self.path == "/chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                return self.trickle([b"1\r\n", b"x", b"\r\n"] * 13)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            return self.trickle([b"x"] * 40)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass

    srv = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("where", ["body", "headers", "chunked"])
def test_a_server_that_trickles_bytes_is_cut_off_at_the_deadline(hostile_server, where):
    """The deadline bounds the whole try, however slowly bytes come (a hang, not a speed test: the bound is
    generous; the server trickles for 8 s)."""
    from sgl_cli.engine.io.fetch import FetchError, FetchPolicy, fetch

    policy = FetchPolicy(timeout_s=1.0, retries=0)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as caught:
        fetch(f"{hostile_server}/{where}", policy)
    elapsed = time.monotonic() - t0
    assert elapsed < 3 * policy.timeout_s, elapsed
    assert str(caught.value) == "timed out after 1 s (after 1 try)"
    # A retry gets its own try, within what the policy promises for the whole fetch.
    policy = FetchPolicy(timeout_s=1.0, retries=1)
    assert policy.limit_s == 2.5
    t0 = time.monotonic()
    with pytest.raises(FetchError, match=r"^timed out after 1 s \(after 2 tries\)$"):
        fetch(f"{hostile_server}/{where}", policy)
    assert time.monotonic() - t0 < policy.limit_s + 2


def test_a_trickled_image_url_is_an_error_record_naming_it(tmp_path, hostile_server, preset_file):
    from sgl_cli.engine import Run, load_preset
    from sgl_cli.engine.io.fetch import FetchPolicy

    (img,) = make_images(tmp_path, sizes=((56, 56),))
    src = tmp_path / "u.jsonl"
    src.write_text(_good(f"{hostile_server}/body") + "\n" + _good(img.name) + "\n")
    out = tmp_path / "out.jsonl"
    Run(src, load_preset(str(preset_file)), out=out, fetch=FetchPolicy(timeout_s=1.0, retries=0)).execute()
    slow, good = strict_records(out)
    assert slow["error"] == (f"line 1: image '{hostile_server}/body' could not be fetched: timed out after 1 s "
                             "(after 1 try)")
    assert good["error"] is None


@pytest.mark.parametrize("path, want", [
    ("/loop", "too many redirects (over 10) or a redirect loop"),
    ("/ftp", "the server redirected to a ftp URL (ftp://127.0.0.1/x.png); sgl fetches http and https only"),
])
def test_redirects_that_go_nowhere_are_one_line(hostile_server, path, want):
    from sgl_cli.engine.io.fetch import FetchError, FetchPolicy, fetch

    with pytest.raises(FetchError) as caught:
        fetch(hostile_server + path, FetchPolicy(timeout_s=5.0, retries=0))
    assert str(caught.value) == want


# -- resume against an edited input ---------------------------------------------------------------------------
QUESTIONS = ["What color is the square?", "How many circles are there?", "What shape is red?"]


def _write_input(fmt: str, folder: Path, rows: list[tuple[str, str]]) -> Path:
    """rows of (image file name, question) as an input of format `fmt`."""
    if fmt == "sgl":
        path = folder / "in.jsonl"
        path.write_text("".join(_good(image, q) + "\n" for image, q in rows))
    elif fmt == "openai":
        path = folder / "in.jsonl"
        path.write_text("".join(json.dumps({
            "custom_id": f"r{q[:12]}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": q}]}]}}) + "\n"
            for image, q in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "in.parquet"
        pq.write_table(pa.table({"image": [image for image, _ in rows], "question": [q for _, q in rows]}), path)
    else:
        datasets = pytest.importorskip("datasets")
        path = folder / "in_ds"
        if path.exists():
            import shutil

            shutil.rmtree(path)
        datasets.Dataset.from_dict({"image": [str(folder / image) for image, _ in rows],
                                    "question": [q for _, q in rows]}).cast_column(
            "image", datasets.Image()).save_to_disk(str(path))
    return path


def _interrupted_run(fmt, tmp_path, preset_file) -> tuple[list, Path, Path]:
    """A whole run of three items, then its output cut to two records as a kill leaves it."""
    imgs = make_images(tmp_path, sizes=((56, 56), (84, 56), (56, 84)))
    rows = [(p.name, q) for p, q in zip(imgs, QUESTIONS)]
    src = _write_input(fmt, tmp_path, rows)
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q", "--no-exit",
                              "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    whole = out.read_text().splitlines(keepends=True)
    out.write_text("".join(whole[:2]))
    return rows, src, out


def _sha(rec: dict):
    if "response" not in rec:
        return rec["input_sha"]
    return rec["response"]["body"]["sgl"]["input_sha"] if rec["response"] else rec["error"]["sgl"]["input_sha"]


@pytest.mark.parametrize("fmt, edit", [(fmt, edit) for fmt in ("sgl", "openai", "parquet", "dataset")
                                        for edit in ("insert", "delete", "edit")] + [("sgl", "moved")])
def test_resume_refuses_an_input_whose_answered_items_changed(tmp_path, preset_file, monkeypatch, fmt, edit):
    """Insert an item at the top, delete one, edit one in place, or move the input away from its images: the
    resumed run is refused in one line naming the first line (or row) that differs, before any model loads."""
    from sgl_cli.engine.backends import transformers as models

    rows, src, out = _interrupted_run(fmt, tmp_path, preset_file)
    assert all(isinstance(_sha(r), str) and len(_sha(r)) == 16 for r in strict_records(out))
    if edit == "insert":
        rows, first = [(rows[0][0], "What is in the corner?"), *rows], 1
    elif edit == "delete":
        rows, first = [rows[0], rows[2]], 2
    elif edit == "edit":
        rows, first = [(rows[0][0], rows[0][1] + " Be brief."), *rows[1:]], 1
    else:
        (tmp_path / "moved").mkdir()
        src, first = src.rename(tmp_path / "moved" / src.name), 1
    if edit != "moved":
        _write_input(fmt, tmp_path, rows)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    before = out.read_bytes()
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "--resume",
                              "--no-exit", "--max-new-tokens", "3"])
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1
    unit = "row" if fmt in ("parquet", "dataset") else "line"
    if edit == "moved":  # its bytes are the same: where its images resolve is what changed, and is said
        assert f"cannot resume: line 1 of {src} is unchanged, but its images now resolve to other files" in \
            res.stderr and f"(image 'img0.png' is {src.parent.resolve() / 'img0.png'}, was " in res.stderr, res.stderr
    elif fmt == "openai" and edit in ("insert", "delete"):  # its custom_id already differs
        assert f"record {first} of {out} is for 'r{QUESTIONS[first - 1][:12]}'" in res.stderr, res.stderr
    else:
        assert f"cannot resume: {unit} {first} of {src} is not the item record {first} of {out} answered" in \
            res.stderr and "the input changed since the interrupted run" in res.stderr, res.stderr
    assert out.read_bytes() == before


def test_resume_of_records_without_a_fingerprint_warns_and_completes(tmp_path, preset_file):
    """Records of an sgl that did not write input_sha: resumed on their line numbers, with a warning."""
    rows, src, out = _interrupted_run("sgl", tmp_path, preset_file)
    old = [{k: v for k, v in r.items() if k != "input_sha"} for r in strict_records(out)]
    out.write_text("".join(json.dumps(r) + "\n" for r in old))
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "--resume", "-q",
                              "--no-exit", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert (f"warning: 2 record(s) of {out} carry no input_sha (written by an older sgl): resuming checks their "
            "lines, not their content") in res.stderr
    recs = strict_records(out)
    assert [r["line"] for r in recs] == [1, 2, 3] and recs[:2] == old and len(recs[2]["input_sha"]) == 16


def test_resume_names_a_duplicated_record_as_such(tmp_path, preset_file):
    rows, src, out = _interrupted_run("sgl", tmp_path, preset_file)
    first, second = out.read_text().splitlines(keepends=True)
    out.write_text(first + second + second)
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "--resume",
                              "--no-exit", "--max-new-tokens", "3"])
    assert res.exit_code == 2
    assert res.stderr == (f"sgl: error: cannot resume: {out} holds a duplicate record for line 2 (records 2 and 3); "
                          "it was not written by one sgl run alone; write to a new --out\n")


# -- images --------------------------------------------------------------------------------------------------------
def _load(path: Path):
    from sgl_cli.engine.io.images import load_images
    from sgl_cli.engine.io.items import ImageRef, Item

    return load_images(Item(line=1, id=1, images=[ImageRef.path(path)]))[0]


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    ramp16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    Image.fromarray(ramp16.astype(np.int32)).save(tmp_path / "g32.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f01.tif")
    Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32)).save(tmp_path / "f255.tif")
    for name, want in (("g16.png", [0, 100, 255]), ("g32.tif", [0, 100, 255]), ("f01.tif", [0, 128, 255]),
                       ("f255.tif", [0, 100, 255])):
        got = np.asarray(_load(tmp_path / name))
        assert got.shape == (1, 3, 3) and got[0, :, 0].tolist() == want and (got[..., 0] == got[..., 2]).all(), name


def test_unconvertible_images_are_refused(tmp_path):
    import numpy as np
    from PIL import Image

    from sgl_cli.engine.errors import ItemError

    Image.fromarray(np.array([[0.0, float("nan")]], dtype=np.float32)).save(tmp_path / "nan.tif")
    Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)).save(tmp_path / "wide.tif")
    for name, why in (("nan.tif", "non-finite"), ("wide.tif", "outside 0-65535")):
        with pytest.raises(ItemError, match=f"line 1: image '{name}' has .*{why}"):
            _load(tmp_path / name)


def test_exif_orientation_and_transparency(tmp_path):
    import numpy as np
    from PIL import Image

    im = Image.new("RGB", (64, 32), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 16, 16))  # red in the top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    shown = np.asarray(_load(tmp_path / "rot.jpg"))
    assert shown.shape == (64, 32, 3)
    assert shown[8, 24, 0] > 200 and shown[8, 8, 0] < 50  # the red corner is now top right
    clear = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    clear.save(tmp_path / "clear.png")
    assert np.asarray(_load(tmp_path / "clear.png")).tolist() == [[[255, 255, 255]] * 2] * 2


def test_a_huge_picture_is_decoded_reduced(tmp_path):
    from PIL import Image

    from sgl_cli.engine.io import images
    from sgl_cli.engine.io.items import ImageRef, Item

    Image.new("RGB", (6000, 4000), (200, 100, 50)).save(tmp_path / "big.jpg", quality=80)
    item = Item(line=1, id=1, images=[ImageRef.path(tmp_path / "big.jpg")])
    (small,) = images.load_images(item, max_pixels=448 * 448)
    assert small.size[0] * small.size[1] < 6000 * 4000 / 3 and abs(small.size[0] / small.size[1] - 1.5) < 0.01
    (full,) = images.load_images(item)
    assert full.size == (6000, 4000)  # no processor budget given: nothing is reduced


# -- presets --------------------------------------------------------------------------------------------------------
ALIAS_BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"]
                       + [f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")])


@pytest.mark.parametrize("text, want", [
    (ALIAS_BOMB + "\nlarge: {model: x}\nprompt_suffix: *i\n", "aliases expand to over 100,000 values"),
    ("large: {model: x}\nprompt_suffix: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("large: {model: x}\nretian: 0.5\n", "unknown key 'retian' (did you mean 'retain'?); known keys: name, "
                                         "description, small, large, retain,"),
    ("large: {model: x}\nprompt_suffix: [" + "1, " * 5000 + "1]\n", "prompt_suffix must be str, got [1, 1, 1"),
])
def test_hostile_presets_fail_fast_in_one_short_line(tmp_path, text, want):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    from sgl_cli.engine.errors import PresetError
    from sgl_cli.engine.preset import load_preset

    with pytest.raises(PresetError) as exc:
        load_preset(str(path))
    assert time.perf_counter() - t0 < 20
    message = str(exc.value)
    assert want in message and "\n" not in message and len(message) < 600, message


def test_a_non_utf8_preset_is_one_line(tmp_path, batch):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"large: {model: x}\nname: \xff\xfe\n")
    res = runner.invoke(app, ["run", str(batch), "--preset", str(path)])
    assert res.exit_code == 2 and res.stderr == f"sgl: error: {path}: not UTF-8 text (byte 0xff at offset 24)\n"


@pytest.mark.parametrize("text, want", [
    (b"large: {model: x}\nname: a\x00b\n", "holds an unreadable character NUL (\\0) at line 2, column 8"),
    (b"large: {model: x}\n\x07name: a\n", "holds an unreadable character U+0007 at line 2, column 1"),
    (b"large: {model: x}\nretain: 0.1\nname: a\nretain: 0.5\n", "key 'retain' given twice in one mapping (lines 2 "
                                                               "and 4); keep one"),
    (b"name: a\nlarge: {model: x, model: y}\n", "key 'model' given twice in one mapping (line 2); keep one"),
    (b"large: {model: x}\n", "missing key 'name'"),
    (b"name: a\nlarge: {dtype: float32}\n", "missing key 'large.model'"),
])
def test_bad_bytes_duplicate_and_missing_keys_in_a_preset_are_one_line(tmp_path, batch, text, want):
    """Issue 24: a NUL gave a yaml ReaderError traceback; a duplicate key silently took the last value; a missing
    `name` said `_Header.__init__() missing 1 required positional argument`."""
    path = tmp_path / "p.yaml"
    path.write_bytes(text)
    res = runner.invoke(app, ["run", str(batch), "--preset", str(path)])
    assert res.exit_code == 2 and res.stderr.startswith(f"sgl: error: {path}: {want}"), res.output
    assert res.stderr.count("\n") == 1 and len(res.stderr) < 300


def test_bad_bytes_in_a_calibration_file_are_one_line(tmp_path, batch, tiny_pair):
    cal = tmp_path / "cal.yaml"
    cal.write_bytes(b"version: 2\nthreshold: 0.5\x00\n")
    preset = write_preset(tmp_path, tiny_pair, calibration="cal.yaml")
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset)])
    assert res.exit_code == 2
    assert res.stderr == f"sgl: error: {cal}: holds an unreadable character NUL (\\0) at line 2, column 15: YAML " \
                         "allows only printable characters\n"
    cal.unlink()
    cal.mkdir()
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset)])
    assert res.exit_code == 2 and res.stderr == f"sgl: error: {cal} is a folder, not a YAML file\n"


@pytest.mark.parametrize("kind", ["folder", "fifo", "/dev/zero", "missing"])
def test_a_preset_that_is_no_regular_file_is_named_not_waited_on(tmp_path, batch, kind):
    """Issue 24: a folder, FIFO or /dev/zero was reported as "not found" (and reading one must never block)."""
    path = {"folder": tmp_path / "p.yaml", "fifo": tmp_path / "p.yaml", "/dev/zero": Path("/dev/zero"),
            "missing": tmp_path / "nope.yaml"}[kind]
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    proc = subprocess.run([sys.executable, "-m", "sgl_cli", "run", str(batch), "--preset", str(path)],
                          capture_output=True, text=True, timeout=120)
    want = {"folder": f"{path} is a folder, not a YAML file",
            "fifo": f"{path} is a FIFO (named pipe), not a regular file: give a YAML file",
            "/dev/zero": "/dev/zero is a device, not a regular file: give a YAML file",
            "missing": f"preset file {path} not found"}[kind]
    assert proc.returncode == 2 and proc.stderr == f"sgl: error: {want}\n", proc.stderr


def test_a_missing_model_folder_says_so(tmp_path, batch):
    path = write_preset(tmp_path, {"small": "./models/not-here", "large": "./models/not-here"})
    res = runner.invoke(app, ["run", str(batch), "--preset", str(path), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2
    assert "model folder ./models/not-here does not exist" in res.stderr and "Repo id" not in res.stderr


# -- property-based -------------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20)
item_like = st.fixed_dictionaries({}, optional={k: json_values for k in
                                                ("image", "images", "image_base64", "question", "id", "answer",
                                                 "type", "max_new_tokens")})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), item_like.map(lambda d: json.dumps(d).encode()),
                 json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())))
def test_the_line_parser_never_raises_and_always_decides(raw):
    from sgl_cli.engine.io.items import parse_line

    item = parse_line(raw, 7, Path("/tmp"))
    if item.error is not None:
        assert item.error.startswith("line 7: ") and len(item.error) < 400
    else:
        assert item.images and isinstance(item.question, str) and item.question.strip()
        assert isinstance(item.id, (str, int)) and not isinstance(item.id, bool)
        json.dumps({"id": item.id, "q": item.question, "r": item.reference}, allow_nan=False).encode("utf-8")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["name", "description", "small", "large", "retain", "prune_layer",
                                        "threshold", "guide", "batch_size", "prompt_suffix", "max_new_tokens",
                                        "oops"]), json_values, max_size=6) | json_values)
def test_the_preset_loader_raises_only_preset_errors(tmp_path, data):
    import yaml

    from sgl_cli.engine.errors import PresetError
    from sgl_cli.engine.preset import load_preset

    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(data))
    except (yaml.YAMLError, UnicodeEncodeError):
        return
    try:
        preset = load_preset(str(path))
    except PresetError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000
    else:
        preset.settings.validate("fuzz")


def _nest(value: str, depth: int, kinds: str) -> str:
    """`value` inside `depth` lists and objects, in the pattern `kinds` repeats ("l": a list, "o": an object)."""
    opens, closes = [], []
    for i in range(depth):
        if kinds[i % len(kinds)] == "l":
            opens.append("[")
            closes.append("]")
        else:
            opens.append('{"k": ')
            closes.append("}")
    return "".join(opens) + value + "".join(reversed(closes))


deep_values = st.builds(_nest, st.sampled_from(['"\\ud800"', '"ok"', "1", "null", "NaN", "[]"]),
                        st.integers(300, 1000), st.sampled_from(["l", "o", "lo", "llo"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deep_values, st.sampled_from(["x", "question", "image", "images", "id", "answer", "type", "max_new_tokens"]))
def test_deep_nesting_anywhere_never_raises(deep, field):
    """Issue 24: every line json.loads accepts (nesting up to ~990 levels) gives an item or an error naming the line."""
    from sgl_cli.engine.io.items import parse_line

    obj = {"image": "a.png", "question": "q"}
    obj.pop(field, None)
    text = json.dumps(obj)[:-1] + f', "{field}": {deep}}}'
    item = parse_line(text, 3, Path("/tmp"))
    assert item.error is None or (item.error.startswith("line 3: ") and len(item.error) < 400)
    if item.error is None:
        assert field in ("x",) and item.question == "q"
    if '"\\ud800"' in deep and item.error is not None and "JSON" not in item.error and "must be" not in item.error:
        assert "holds a lone surrogate" in item.error


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deep_values, st.sampled_from(["custom_id", "x", "body", "body.messages", "body.metadata", "content", "url"]))
def test_openai_lines_nested_deep_never_raise_and_keep_a_custom_id(deep, where):
    """Whatever a request line holds, its item has a non-empty custom_id an output line can carry and resume by."""
    from sgl_cli.engine.io.formats.openai import parse_request

    parts = {"content": '[{"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "q"}]'}
    if where == "content":
        parts["content"] = deep
    messages = deep if where == "body.messages" else f'[{{"role": "user", "content": {parts["content"]}}}]'
    body = deep if where == "body" else '{"messages": %s%s}' % (messages, f', "metadata": {deep}'
                                                                  if where == "body.metadata" else "")
    line = ('{"custom_id": %s, "method": "POST", "url": %s, "body": %s%s}'
            % (deep if where == "custom_id" else '"c1"', deep if where == "url" else '"/v1/chat/completions"', body,
               f', "x": {deep}' if where == "x" else ""))
    item = parse_request(line.encode(), 5, Path("/tmp"))
    assert isinstance(item.custom_id, str) and item.custom_id
    json.dumps({"custom_id": item.custom_id}, allow_nan=False).encode("utf-8")
    if item.error is not None:
        assert item.error.startswith("line 5: ") and len(item.error) < 400
        assert item.custom_id in ("c1", "sgl-line-5")
    else:
        assert item.custom_id == "c1" and where in ("x", "body.metadata") and item.question == "q"
    if where == "custom_id":
        assert item.custom_id == "sgl-line-5"


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda cid, junk: json.dumps({"custom_id": cid, "body": {}}).encode()[:-1] + junk + b"}",
                           st.text(min_size=1, max_size=20), st.sampled_from([b', "n": NaN', b', "n": ' + b"9" * 5000,
                                                                             b', "b": "\xff"', b", oops", b""]))))
def test_an_openai_line_keeps_its_recoverable_custom_id(raw):
    """A request line sgl refuses keeps the custom_id it holds (NaN, a huge integer or bad bytes elsewhere), else
    gets sgl-line-N: never null, so sgl can resume from every line it writes."""
    from sgl_cli.engine.io.formats.openai import parse_request

    item = parse_request(raw, 2, Path("/tmp"))
    try:
        own = json.loads(raw.decode("utf-8", "surrogateescape"), parse_constant=lambda _: None,
                         parse_int=lambda _: 0).get("custom_id")
    except (ValueError, AttributeError, RecursionError):
        own = None
    usable = isinstance(own, str) and own and not any("\ud800" <= c <= "\udfff" for c in own)
    assert item.custom_id == (own if usable else "sgl-line-2")
    assert item.error is None or item.error.startswith("line 2: ")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.integers(0, 4), st.integers(0, 1), st.floats(0.05, 0.95), st.binary(min_size=1, max_size=64))
def test_a_damaged_parquet_page_gives_every_row_one_item_in_order(tmp_path, group, column, where, junk):
    """Bytes overwritten anywhere in one row group's column chunk: every row still yields one item, in order; the
    rows of a group pyarrow cannot read are errors naming their row and the row group; the others read as
    written (or, where the damage decodes to other values, still as items)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sgl_cli.engine.io.formats import open_source

    path = tmp_path / "d.parquet"
    rows = [{"image": f"img{i}.png", "question": f"question {i} " * (1 + i % 3)} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    col = pq.ParquetFile(path).metadata.row_group(group).column(column)
    start = col.dictionary_page_offset or col.data_page_offset
    at = start + int(where * (col.total_compressed_size - 1))
    data = bytearray(path.read_bytes())
    n = min(len(junk), start + col.total_compressed_size - at)  # inside the chunk; the file keeps its size
    data[at:at + n] = junk[:n]
    path.write_bytes(bytes(data))
    try:
        pq.ParquetFile(path).read_row_group(group)
        readable = True
    except (pa.ArrowException, OSError, ValueError):
        readable = False
    source = open_source(path)
    items = [source.parse(line, payload) for line, payload in source]
    assert [it.line for it in items] == list(range(1, 21)) and source.count() == 20
    for it in items:
        if group * 4 < it.line <= group * 4 + 4 and not readable:
            assert it.error.startswith(f"row {it.line}: d.parquet: row group {group + 1} of 5 cannot be read (")
        elif not group * 4 < it.line <= group * 4 + 4:
            assert it.error is None and it.question == rows[it.line - 1]["question"].strip()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.integers(0, 60), st.binary(min_size=1, max_size=6), st.booleans())
def test_bytes_put_anywhere_in_a_preset_give_one_line_errors(tmp_path, at, junk, repeat_key):
    """NUL and other control bytes, bad UTF-8, a key given twice: a preset either loads or fails in one line that
    names the file (never a yaml traceback, never a silently dropped value)."""
    from sgl_cli.engine.errors import PresetError
    from sgl_cli.engine.preset import load_preset

    text = b"name: t\nlarge: {model: x}\nretain: 0.2\nthreshold: 0.5\n" + (b"retain: 0.3\n" if repeat_key else b"")
    at = min(at, len(text))
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text[:at] + junk + text[at:])
    try:
        preset = load_preset(str(path))
    except PresetError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 600 and str(path) in message, message
    else:
        import yaml

        keys = [k.value for k, _ in yaml.compose(path.read_text()).value]
        assert len(keys) == len(set(keys)), keys  # a duplicated key never loads
        assert preset.name == yaml.safe_load(path.read_text())["name"]
