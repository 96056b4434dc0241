"""The streaming pipeline on vLLM: the small stage hands each item over as its batch ends, vLLM keeps them in flight
(continuous batching through `LLM.enqueue` and its engine's `step`), and the records are the serial pipeline's, in
input order: with exits, errors and two images per item, at several batch sizes."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
from conftest import comparable

from sgl_cli.engine.preset import load_preset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def engine(vllm_preset):
    from sgl_cli.engine import Engine

    eng = Engine.load(load_preset(str(vllm_preset)).with_settings(retain=0.25))
    yield eng
    eng.large.close()
    gc.collect()


@pytest.fixture
def mixed(tmp_path) -> Path:
    rows = [json.loads(line) for line in (EXAMPLES / "batch.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = str(EXAMPLES / r["image"])
    rows[2:2] = [{"images": [rows[0]["image"], rows[1]["image"]], "question": "Which shape is in both?"},
                 {"image": str(EXAMPLES / "missing.png"), "question": "where?"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    return path


@pytest.mark.parametrize("batch, large_batch", [(1, None), (3, 2), (4, None)])
def test_streaming_on_vllm_gives_the_serial_records(engine, mixed, batch, large_batch):
    import dataclasses

    from sgl_cli.engine import read_items

    def run(**changes):
        eng = engine.with_settings(batch_size=batch, **changes)
        return eng, list(eng.run(read_items(mixed)))

    _, serial = run(pipeline="serial")
    eng, streamed = run(pipeline="streaming", large_batch_size=large_batch)
    assert [r["line"] for r in streamed] == list(range(1, 12))
    assert comparable(streamed) == comparable(serial)
    assert sum(r["error"] is not None for r in streamed) == 2
    assert {r["exit"] for r in streamed if r["error"] is None} == {"small", "large"}
    two = streamed[2]
    assert two["error"] is None and two["visual_tokens"] > streamed[0]["visual_tokens"]
    busy = eng.last_stream.busy
    assert busy.items == 11 and 0 < busy.large <= busy.wall and 0 < busy.small <= busy.wall
    assert dataclasses.asdict(busy)["in_flight_max"] >= 1
