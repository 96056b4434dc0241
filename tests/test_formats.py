"""Real batch files: OpenAI Batch API input and output, image URLs (a loopback server), data URIs and inline
base64, Parquet and saved datasets, several images per item; each with one record per item, errors naming the line
or row, and resume."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sgl_cli.cli import app
from tests.conftest import analyze, make_images, write_jsonl

runner = CliRunner()
Q = "What color is the square?"


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def answers_of(path: Path) -> list:
    return [r["answer"] for r in records(path)]


def run(args, code=0) -> str:
    res = runner.invoke(app, ["run", *map(str, args), "-q"])
    assert res.exit_code == code, res.output
    return res.stderr


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path, sizes=((112, 84), (84, 112)))


@pytest.fixture
def reference(tmp_path, images, preset_file):
    """The answers sgl JSONL gives for each image and Q: what every other way of naming the image must give."""
    src = write_jsonl(tmp_path / "ref.jsonl", [{"image": p.name, "question": Q, "max_new_tokens": 5} for p in images])
    run([src, "--preset", preset_file, "--no-exit"])
    return records(tmp_path / "ref.sgl.jsonl")


# -- OpenAI batch files ---------------------------------------------------------------------------------------------
def request(custom_id, messages, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "any", "messages": messages, **body}}


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_openai_batch_round_trip_field_by_field(tmp_path, images, preset_file, reference, tiny_pair):
    from sgl_cli.engine.core.processors import load_processor

    uri = "data:image/png;base64," + base64.b64encode(images[1].read_bytes()).decode()
    lines = [
        request("plain", [{"role": "user", "content": [image_part(images[0].name), {"type": "text", "text": Q}]}],
                max_tokens=5),
        request("uri", [{"role": "user", "content": [image_part(uri), {"type": "text", "text": Q}]}],
                max_completion_tokens=5, temperature=0, top_p=1, n=1, seed=3),
        request("system", [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": Q}, image_part(images[0].name)]}],
                max_tokens=1),
        request("hot", [{"role": "user", "content": [image_part(images[0].name), {"type": "text", "text": Q}]}],
                temperature=0.7),
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        request("noimage", [{"role": "user", "content": Q}]),
        request("plain", [{"role": "user", "content": [image_part(images[0].name), {"type": "text", "text": Q}]}]),
        request("tools", [{"role": "user", "content": [image_part(images[0].name), {"type": "text", "text": Q}]}],
                tools=[{"type": "function"}]),
        "{not json",
    ]
    src = write_jsonl(tmp_path / "requests.jsonl", lines)
    out = tmp_path / "results.jsonl"
    run([src, "--preset", preset_file, "--out", out, "--no-exit"], code=1)
    got = records(out)
    assert [r.get("custom_id") for r in got] == ["plain", "uri", "system", "hot", "embed", "noimage", "plain", "tools",
                                                 "sgl-line-9"]  # a line too broken to name one: named by its line
    for r in got:
        assert set(r) == {"id", "custom_id", "response", "error"} and r["id"].startswith("batch_req_")
    assert len({r["id"] for r in got}) == len(got)

    processor = load_processor(tiny_pair["large"])

    def prompt_tokens(messages, pics):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        from PIL import Image

        return processor(text=[text], images=[Image.open(p).convert("RGB") for p in pics],
                         return_tensors="pt")["input_ids"].shape[1]

    suffix = "Answer with one word."
    for r, ref, pic in ((got[0], reference[0], images[0]), (got[1], reference[1], images[1])):
        assert r["error"] is None
        resp = r["response"]
        assert resp["status_code"] == 200 and isinstance(resp["request_id"], str)
        body = resp["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny-test"
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == ref["answer"]  # the same item as sgl JSONL answers it
        assert choice["finish_reason"] == ref["finish_reason"] and choice["logprobs"] is None
        want = prompt_tokens([{"role": "user", "content": [{"type": "image"},
                                                           {"type": "text", "text": f"{Q}\n{suffix}"}]}],
                             [pic])
        usage = body["usage"]
        assert usage["prompt_tokens"] == want == ref["usage"]["prompt_tokens"]
        assert usage["completion_tokens"] == ref["usage"]["completion_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        sgl = body["sgl"]
        assert sgl["exit"] == "large" and sgl["visual_tokens"] == ref["visual_tokens"] and sgl["line"] in (1, 2)
    # The system message and the text-before-image order reach the chat template as written.
    system = got[2]["response"]["body"]
    assert system["usage"]["prompt_tokens"] == prompt_tokens(
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "text", "text": f"{Q}\n{suffix}"}, {"type": "image"}]}], [images[0]])
    assert system["choices"][0]["finish_reason"] == "length" and system["usage"]["completion_tokens"] == 1
    errors = {r["custom_id"]: r for r in got[3:]}
    for key, why in (("hot", "line 4: body temperature 0.7: sgl decodes greedily"),
                     ("embed", "line 5: POST '/v1/embeddings' is not supported"),
                     ("noimage", "line 6: no image_url part in the messages"),
                     ("plain", "line 7: custom_id 'plain' repeats line 1's"),
                     ("tools", "line 8: body field 'tools' is not supported")):
        r = errors[key]
        assert r["response"] is None and r["error"]["code"] == "invalid_request"
        assert r["error"]["message"].startswith(why), r["error"]["message"]
    assert got[-1]["error"]["message"].startswith("line 9: not valid JSON")


def test_openai_output_resumes_without_duplicates(tmp_path, images, preset_file):
    lines = [request(f"r{i}", [{"role": "user", "content": [image_part(p.name), {"type": "text", "text": Q}]}])
             for i, p in enumerate(images * 2)]
    src = write_jsonl(tmp_path / "requests.jsonl", lines)
    out = tmp_path / "results.jsonl"
    run([src, "--preset", preset_file, "--out", out])
    whole = out.read_text().splitlines()
    out.write_text("\n".join(whole[:2]) + "\n" + whole[2][:30])  # two records and a torn third
    run([src, "--preset", preset_file, "--out", out, "--resume"])
    again = records(out)
    assert [r["custom_id"] for r in again] == ["r0", "r1", "r2", "r3"]

    def content(r):
        return r["response"]["body"]["choices"][0]["message"]["content"]

    assert [content(r) for r in again] == [content(json.loads(x)) for x in whole]


def test_every_openai_output_line_can_be_resumed_from(tmp_path, images, preset_file):
    """Issue 24: the error line of a request without a usable custom_id was written with custom_id null, and sgl
    then refused to resume from its own output; a line refused for NaN lost the custom_id it had."""
    good = [{"role": "user", "content": [image_part(images[0].name), {"type": "text", "text": Q}]}]
    lines = [
        json.dumps(request("a", good)),
        json.dumps({**request("b", good), "custom_id": None}),  # no usable custom_id
        json.dumps(request("nan", good, temperature=float("nan"))),  # refused for NaN; its custom_id is kept
        json.dumps(request("big", good))[:-1] + ', "n": ' + "9" * 5000 + "}",  # an integer over the digit limit
        b'{"custom_id": "bytes", "x": "\xff"}'.decode("latin-1"),  # not UTF-8 elsewhere in the line
        json.dumps({"custom_id": "nourl", "method": "POST", "body": {"messages": good}}),
        "{not json",
        json.dumps(request("sgl-line-2", good)),  # names the id sgl gave line 2: a duplicate, not a second line
        json.dumps(request("z", good)),
    ]
    src = tmp_path / "requests.jsonl"
    src.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    out = tmp_path / "results.jsonl"
    run([src, "--preset", preset_file, "--out", out], code=1)
    got = records(out)
    assert [r["custom_id"] for r in got] == ["a", "sgl-line-2", "nan", "big", "bytes", "nourl", "sgl-line-7",
                                             "sgl-line-2", "z"]
    message = {r["custom_id"] + str(i): r["error"] and r["error"]["message"] for i, r in enumerate(got)}
    assert message["sgl-line-21"] == "line 2: 'custom_id' must be a non-empty string, got None (its output line " \
                                     "has custom_id 'sgl-line-2')"
    assert message["nan2"] == "line 3: not valid JSON: NaN is not JSON"
    assert message["big3"] == "line 4: not valid JSON: an integer with too many digits"
    assert message["bytes4"].startswith("line 5: not UTF-8")
    assert message["nourl5"] == "line 6: missing field 'url': sgl answers POST /v1/chat/completions"
    assert message["sgl-line-76"].startswith("line 7: not valid JSON")
    assert message["sgl-line-27"] == "line 8: custom_id 'sgl-line-2' repeats line 2's; custom_ids must be unique"
    assert got[0]["error"] is None and got[-1]["error"] is None
    whole = out.read_bytes().splitlines(keepends=True)
    for cut in (2, 7):  # interrupted after the unnamed line, and after the unparseable one
        out.write_bytes(b"".join(whole[:cut]))
        run([src, "--preset", preset_file, "--out", out, "--resume"], code=1)
        assert out.read_bytes().splitlines(keepends=True)[:cut] == whole[:cut]
        assert [r["custom_id"] for r in records(out)] == [r["custom_id"] for r in got]
    # An output of an sgl before this fix: the unnamed line's record says custom_id null; it still resumes.
    old = json.loads(whole[1])
    old["custom_id"] = None
    out.write_bytes(whole[0] + (json.dumps(old) + "\n").encode())
    run([src, "--preset", preset_file, "--out", out, "--resume"], code=1)
    again = records(out)
    assert [r["custom_id"] for r in again[2:]] == [r["custom_id"] for r in got[2:]]
    assert again[1]["custom_id"] is None and len(again) == len(got)


# -- image references -------------------------------------------------------------------------------------------
class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that gave up (timed out, over the size limit) closes the connection: expected here


@pytest.fixture
def server(images):
    """A loopback server: /ok (the first image), /missing (404), /slow (never answers in time), /huge (more
    bytes than allowed), /html (not an image), /flaky (503 once, then the image)."""
    body = images[0].read_bytes()
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0]
            hits[path] = hits.get(path, 0) + 1
            if path == "/ok" or (path == "/flaky" and hits[path] > 1):
                return self._send(200, "image/png", body)
            if path == "/flaky":
                return self._send(503, "text/plain", b"busy")
            if path == "/slow":
                time.sleep(3)
                return self._send(200, "image/png", body)
            if path == "/huge":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                try:
                    for _ in range(64):
                        self.wfile.write(b"\0" * (1 << 16))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return
            if path == "/html":
                return self._send(200, "text/html", b"<html></html>")
            return self._send(404, "text/plain", b"no")

        def _send(self, code, kind, data):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()


def test_every_way_of_naming_an_image_gives_the_same_answer(tmp_path, images, preset_file, reference, server):
    from sgl_cli.engine import Run, load_preset
    from sgl_cli.engine.io.fetch import FetchPolicy

    url, hits = server
    b64 = base64.b64encode(images[0].read_bytes()).decode()
    rows = [{"image": images[0].name}, {"image": str(images[0])}, {"image": images[0].as_uri()},
            {"image": "data:image/png;base64," + b64}, {"image_base64": b64}, {"image": f"{url}/ok"},
            {"image": f"{url}/flaky"}, {"image": f"{url}/missing"}, {"image": f"{url}/slow"},
            {"image": f"{url}/huge"}, {"image": f"{url}/html"}]
    src = write_jsonl(tmp_path / "refs.jsonl", [{**r, "question": Q, "max_new_tokens": 5} for r in rows])
    preset = load_preset(str(preset_file)).with_settings(no_exit=True)
    policy = FetchPolicy(timeout_s=1.0, max_bytes=1 << 20, retries=1)
    Run(src, preset, out=tmp_path / "refs.out.jsonl", fetch=policy).execute()
    got = records(tmp_path / "refs.out.jsonl")
    for r in got[:7]:
        assert r["error"] is None and r["answer"] == reference[0]["answer"], r
    assert hits["/flaky"] == 2  # one 503, one retry
    assert got[7]["error"] == f"line 8: image '{url}/missing' could not be fetched: HTTP 404 Not Found"
    assert got[8]["error"].startswith(f"line 9: image '{url}/slow' could not be fetched: timed out after 1 s")
    assert got[9]["error"] == f"line 10: image '{url}/huge' could not be fetched: more than the 1 MiB limit"
    assert got[10]["error"] == (f"line 11: image '{url}/html' could not be fetched: the server sent text/html, "
                                "not an image")
    # --no-fetch: a URL is an error record, nothing is fetched.
    before = dict(hits)
    run([src, "--preset", preset_file, "--no-fetch", "--out", tmp_path / "nofetch.jsonl"], code=1)
    nofetch = records(tmp_path / "nofetch.jsonl")
    assert nofetch[5]["error"] == f"line 6: image '{url}/ok' is a URL and fetching is off (--no-fetch)" or \
        "fetching URLs is off" in nofetch[5]["error"]
    assert hits == before


def test_urls_are_fetched_ahead_of_the_batch_being_computed(tmp_path, images, engine_factory, server, monkeypatch):
    """While the first batch computes, the next items' URLs are already being fetched."""
    from sgl_cli.engine.io.formats import read_items

    url, _ = server
    src = write_jsonl(tmp_path / "u.jsonl", [{"image": f"{url}/ok?{i}", "question": Q} for i in range(3)])
    eng = engine_factory(batch_size=1)
    seen = []
    real = type(eng).prepare  # each batch's first stage, on either pipeline

    def prepare(self, items):
        seen.append(sorted(self.fetcher._wanted))
        return real(self, items)

    monkeypatch.setattr(type(eng), "prepare", prepare)
    recs = list(eng.run(read_items(src)))
    assert all(r["error"] is None for r in recs)
    assert len(seen[0]) == 3  # every item's URL was submitted before the first batch ran


# -- Parquet and datasets ---------------------------------------------------------------------------------------
def test_parquet_rows_are_items(tmp_path, images, preset_file, reference):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = images[0].read_bytes()
    structs = pa.table({
        "picture": [{"bytes": data, "path": None}, {"bytes": None, "path": images[1].name}, None,
                    {"bytes": data, "path": "ignored.png"}],
        "query": [Q] * 4,
        "label": ["red", "blue", "x", "y"],
        "key": ["a", "b", "c", "d"],
    })
    src = tmp_path / "items.parquet"
    pq.write_table(structs, src, row_group_size=2)
    out = tmp_path / "p.jsonl"
    run([src, "--preset", preset_file, "--out", out, "--no-exit", "--image-column", "picture", "--question-column",
         "query", "--answer-column", "label", "--id-column", "key", "--max-new-tokens", "5"], code=1)
    got = records(out)
    assert [r["line"] for r in got] == [1, 2, 3, 4] and [r["id"] for r in got] == ["a", "b", "c", "d"]
    assert [got[0]["answer"], got[1]["answer"], got[3]["answer"]] == [reference[0]["answer"],
                                                                       reference[1]["answer"], reference[0]["answer"]]
    assert got[0]["reference"] == "red"
    assert got[2]["error"] == "row 3: the image column holds no image (got None)"
    # Raw bytes, and path strings, in plain columns.
    pq.write_table(pa.table({"image": [data, b""], "question": [Q, Q]}), tmp_path / "raw.parquet")
    pq.write_table(pa.table({"image": [images[1].name], "question": [Q]}), tmp_path / "paths.parquet")
    run([tmp_path / "raw.parquet", "--preset", preset_file, "--no-exit", "--max-new-tokens", "5"], code=1)
    raw = records(tmp_path / "raw.sgl.jsonl")
    assert raw[0]["answer"] == reference[0]["answer"] and raw[1]["error"].startswith("row 2: the image column holds")
    run([tmp_path / "paths.parquet", "--preset", preset_file, "--no-exit", "--max-new-tokens", "5"])
    assert answers_of(tmp_path / "paths.sgl.jsonl") == [reference[1]["answer"]]
    run([src, "--preset", preset_file, "--out", tmp_path / "two.jsonl", "--no-exit", "--image-column", "picture",
         "--question-column", "query", "--limit", "2", "--max-new-tokens", "5"])
    assert len(records(tmp_path / "two.jsonl")) == 2
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "no column 'image' or 'question' (columns: picture, query, label, key)" in res.stderr


def _corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the second half of the question column's chunk in row group `group` (its data page's payload)."""
    import pyarrow.parquet as pq

    col = pq.ParquetFile(path).metadata.row_group(group).column(1)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    end = start + col.total_compressed_size
    data[start + col.total_compressed_size // 2:end] = b"\xab" * (end - start - col.total_compressed_size // 2)
    path.write_bytes(bytes(data))


def test_a_corrupt_row_group_gives_one_error_per_row_and_the_run_goes_on(tmp_path, images, preset_file):
    """Issue 24: a corrupt data page mid-file killed the run (rows after it never got a record, and --resume died
    on the same page). Each row of the unreadable row group is an error record naming its row; the rest run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 20
    src = tmp_path / "items.parquet"
    pq.write_table(pa.table({"image": [images[i % 2].name for i in range(n)],
                             "question": [f"{Q} (item {i}, asked in some more words)" for i in range(n)]}),
                   src, row_group_size=4)
    _corrupt_row_group(src, 2)  # rows 9-12
    pf = pq.ParquetFile(src)
    with pytest.raises(OSError):
        pf.read_row_group(2)
    assert [pf.read_row_group(g).num_rows for g in (0, 1, 3, 4)] == [4, 4, 4, 4]
    out = tmp_path / "out.jsonl"
    run([src, "--preset", preset_file, "--out", out, "--max-new-tokens", "2"], code=1)
    got = records(out)
    assert [r["line"] for r in got] == list(range(1, n + 1))
    for r in got:
        if 9 <= r["line"] <= 12:
            assert r["error"].startswith(f"row {r['line']}: items.parquet: row group 3 of 5 cannot be read ("), r
            assert len(r["error"]) < 300 and "\n" not in r["error"]
        else:
            assert r["error"] is None and isinstance(r["answer"], str)
    whole = out.read_text().splitlines(keepends=True)
    for cut in (6, 10):  # interrupted before the bad row group, and inside it
        out.write_text("".join(whole[:cut]))
        run([src, "--preset", preset_file, "--out", out, "--max-new-tokens", "2", "--resume"], code=1)
        again = out.read_text().splitlines(keepends=True)
        assert again[:cut] == whole[:cut]
        assert [{**json.loads(x), "ms": None} for x in again] == [{**json.loads(x), "ms": None} for x in whole]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage footer", "jsonl named .parquet"])
def test_a_damaged_parquet_file_is_one_line_before_any_model_loads(tmp_path, images, preset_file, monkeypatch,
                                                                   damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sgl_cli.engine.backends import transformers as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    src = tmp_path / "items.parquet"
    pq.write_table(pa.table({"image": [images[0].name] * 8, "question": [Q] * 8}), src, row_group_size=4)
    data = src.read_bytes()
    src.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                     "garbage footer": data[:-40] + b"\x07" * 36 + data[-4:],
                     "jsonl named .parquet": b'{"image": "a.png", "question": "q"}\n'}[damage])
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and res.exception is None or isinstance(res.exception, SystemExit)
    assert res.stderr.startswith(f"sgl: error: {src}: not a Parquet file sgl can read (") and \
        res.stderr.count("\n") == 1, res.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_arrow_file_in_a_dataset_is_one_line(tmp_path, images, preset_file, monkeypatch, damage):
    datasets = pytest.importorskip("datasets")
    from sgl_cli.engine.backends import transformers as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    datasets.Dataset.from_dict({"image": [str(images[0])] * 30, "question": [Q] * 30}).save_to_disk(
        str(tmp_path / "ds"))
    (arrow,) = (tmp_path / "ds").glob("*.arrow")
    data = arrow.read_bytes()
    arrow.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x13" * len(data), "empty": b""}[damage])
    res = runner.invoke(app, ["run", str(tmp_path / "ds"), "--preset", str(preset_file)])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(f"sgl: error: {arrow}: not an Arrow file sgl can read (") and \
        res.stderr.count("\n") == 1, res.output


def test_a_saved_dataset_and_its_splits(tmp_path, images, preset_file, reference):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in images], "question": [Q, Q]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    run([tmp_path / "one", "--preset", preset_file, "--no-exit", "--max-new-tokens", "5"])
    assert answers_of(tmp_path / "one.sgl.jsonl") == [r["answer"] for r in reference]
    res = runner.invoke(app, ["run", str(tmp_path / "dict"), "--preset", str(preset_file)])
    assert res.exit_code == 2 and "is a dataset with splits train, test: choose one with --split" in res.stderr
    run([tmp_path / "dict", "--split", "test", "--preset", preset_file, "--no-exit", "--max-new-tokens", "5",
         "--out", tmp_path / "test.jsonl"])
    assert answers_of(tmp_path / "test.jsonl") == [reference[1]["answer"]]


# -- several images per item ------------------------------------------------------------------------------------
def _messages(n: int, text: str):
    return [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "internvl"])
def test_several_images_per_item_equal_plain_generate(tmp_path_factory, family):
    """Two images in one item: at retain 1 the large answer is plain `generate` on the processor's own encoding
    of both; visual tokens are both images' together; the budget is over all of them."""
    from PIL import Image

    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.guides.base import n_keep
    from sgl_cli.engine.io.items import ImageRef, Item
    from sgl_cli.engine.preset import ModelSpec, Settings
    from tests.families import build_family

    folder = tmp_path_factory.mktemp(family)
    paths = build_family(family, folder)
    small = load_model(ModelSpec(str(paths["small"]), dtype="float32"), "small")
    large = load_model(ModelSpec(str(paths["large"]), dtype="float32"), "large")
    pics = make_images(folder, sizes=((168, 280), (336, 224)))
    item = Item(line=1, id="two", images=[ImageRef.path(p) for p in pics], question=Q)
    prompt = f"{Q}\nAnswer with one word."
    singles = []
    for p in pics:
        text = large.processor.apply_chat_template(_messages(1, prompt), add_generation_prompt=True, tokenize=False)
        enc = large.processor(text=[text], images=[Image.open(p).convert("RGB")], return_tensors="pt")
        singles.append(int(large.family.visual_mask(large.model, dict(enc)).sum()))
    text = large.processor.apply_chat_template(_messages(2, prompt), add_generation_prompt=True, tokenize=False)
    enc = large.processor(text=[text], images=[Image.open(p).convert("RGB") for p in pics], return_tensors="pt")
    with torch.no_grad():
        plain = large.model.generate(**enc, max_new_tokens=4, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    for retain in (1.0, 0.25):
        eng = Engine(Settings(threshold=None, max_new_tokens=4, prompt_suffix="Answer with one word.", retain=retain),
                     small, large)
        (rec,) = eng.process([item])
        assert rec["error"] is None, rec
        assert rec["visual_tokens"] == sum(singles)
        assert rec["retained_tokens"] == n_keep(sum(singles), retain)
        if retain == 1.0:
            (work,) = analyze(eng, [item])
            eng.large_pass([work], eng.large_inputs([work]))
            assert work.large.tokens == plain
            assert len(work.small.importance) == sum(singles)
    cls = Engine(Settings(threshold=None, max_new_tokens=2, retain=0.25, guide="cls"), None, large)
    (rec,) = cls.process([item])
    assert rec["error"] is None and rec["visual_tokens"] == sum(singles)


def test_a_one_image_family_refuses_several_images_per_item(tmp_path_factory):
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.io.items import ImageRef, Item
    from sgl_cli.engine.preset import ModelSpec, Settings
    from tests.families import build_family

    folder = tmp_path_factory.mktemp("llava")
    paths = build_family("llava", folder)
    large = load_model(ModelSpec(str(paths["large"]), dtype="float32"), "large")
    pics = make_images(folder, sizes=((64, 64), (64, 64)))
    eng = Engine(Settings(threshold=None, max_new_tokens=2, guide="cls"), None, large)
    (rec,) = eng.process([Item(line=4, id=4, images=[ImageRef.path(p) for p in pics], question=Q)])
    assert rec["error"] == "line 4: llava models take 1 image per item; this item has 2"


def test_inspect_draws_each_image(tmp_path, preset_file):
    pics = make_images(tmp_path, sizes=((112, 84), (56, 112)))
    png = tmp_path / "two.png"
    res = runner.invoke(app, ["inspect", *map(str, pics), "--question", Q, "--preset", str(preset_file), "--json",
                              "--png", str(png)])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["images"] == [str(p) for p in pics] and got["image_sizes"] == [[112, 84], [56, 112]]
    assert [g["image"] for g in got["grids"]] == [0, 1]
    assert got["grids"][0]["shape"] == [3, 4] and got["grids"][1]["shape"] == [4, 2]
    assert got["visual_tokens"] == 12 + 8 and len(got["layout"]) == 20
    assert png.exists()
    res = runner.invoke(app, ["inspect", *map(str, pics), "--question", Q, "--preset", str(preset_file)])
    assert res.exit_code == 0 and "image 1 image 3 x 4" in res.stdout and "image 2 image 4 x 2" in res.stdout


# -- the Ray backend reads every format ---------------------------------------------------------------------------
def test_ray_backend_reads_parquet_and_openai_as_the_local_one(ray_cluster, tmp_path, images, preset_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [p.read_bytes() for p in images], "question": [Q, Q]}), tmp_path / "t.parquet")
    write_jsonl(tmp_path / "o.jsonl", [request(f"r{i}", [{"role": "user", "content": [
        image_part(p.name), {"type": "text", "text": Q}]}]) for i, p in enumerate(images)])
    for name in ("t.parquet", "o.jsonl"):
        src = tmp_path / name
        run([src, "--preset", preset_file, "--out", tmp_path / f"{name}.local", "--no-exit"])
        run([src, "--preset", preset_file, "--out", tmp_path / f"{name}.ray", "--no-exit", "--backend", "ray",
             "--num-workers", "1"])

        def strip(r):
            r = {k: v for k, v in r.items() if k not in ("ms", "created")}
            if "response" in r and r["response"]:
                body = dict(r["response"]["body"])
                body.pop("created")
                body["sgl"] = {k: v for k, v in body["sgl"].items() if k != "ms"}
                r["response"] = {**r["response"], "body": body}
            return r

        local = [strip(r) for r in records(tmp_path / f"{name}.local")]
        assert local == [strip(r) for r in records(tmp_path / f"{name}.ray")] and len(local) == 2
