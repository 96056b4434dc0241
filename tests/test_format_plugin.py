"""Third-party input formats: examples/format-plugin (a CSV of image, question[, answer]) installed by pip, offline,
is recognised by `sgl run` and `read_items` like a built-in format, and its items and records equal those of the same
items written as sgl JSONL, field by field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.io import formats
from sgl_cli.engine.io.formats import format_names, open_source, read_items
from tests.conftest import make_images, plugin_on_path, write_jsonl, write_preset

QUESTIONS = ["What color is the square?", "How many circles?", "What shape is red?"]


@pytest.fixture(scope="module")
def plugin(example_site):
    """examples/format-plugin installed by pip (its dist-info carries the entry point, as a real install does), on
    sys.path for this module."""
    with plugin_on_path(example_site("format-plugin"), "sgl_csv_format", formats.refresh) as site:
        yield site


@pytest.fixture
def inputs(tmp_path):
    """The same three items as a CSV (with a blank row and a bad row after them) and as sgl JSONL."""
    imgs = make_images(tmp_path)
    rows = [[p.name, q, "red"] for p, q in zip(imgs, QUESTIONS)]
    rows[1] = rows[1][:2]  # no answer
    with (tmp_path / "data.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows(rows)
        w.writerow([])
        w.writerow([imgs[0].name])  # one field: an error record naming its row
    jsonl = write_jsonl(tmp_path / "data.jsonl", [
        {"image": r[0], "question": r[1], **({"answer": r[2]} if len(r) == 3 else {})} for r in rows])
    return tmp_path / "data.csv", jsonl, imgs


def test_the_format_is_registered_between_name_and_content_formats(plugin):
    assert format_names() == ["dataset", "parquet", "csv", "openai", "sgl"]


def test_csv_items_field_by_field(plugin, inputs):
    csv_path, _, imgs = inputs
    assert open_source(csv_path).kind == "csv" and open_source(csv_path).count() == 4
    items = list(read_items(csv_path))
    assert [i.line for i in items] == [1, 2, 3, 5]
    assert [i.id for i in items] == [1, 2, 3, 5]
    assert [i.question for i in items[:3]] == QUESTIONS
    assert [(i.reference, i.has_reference) for i in items[:3]] == [("red", True), (None, False), ("red", True)]
    assert [[(r.kind, Path(r.value)) for r in i.images] for i in items[:3]] == [[("path", p)] for p in imgs]
    assert [i.error for i in items] == [None, None, None, "row 5: expected image,question[,answer], got 1 field(s)"]


def test_sgl_run_reads_csv_as_it_reads_the_same_jsonl(plugin, inputs, tiny_pair, tmp_path):
    csv_path, jsonl, _ = inputs
    preset = write_preset(tmp_path, tiny_pair)
    for src, out, code in ((csv_path, "csv.out.jsonl", 1), (jsonl, "jsonl.out.jsonl", 0)):
        res = CliRunner().invoke(app, ["run", str(src), "--preset", str(preset), "--out", str(tmp_path / out), "-q"])
        assert res.exit_code == code, res.output  # the CSV's bad row is an error record: exit code 1

    def records(name):
        return [{k: v for k, v in json.loads(x).items() if k != "ms"}
                for x in (tmp_path / name).read_text().splitlines()]

    got, ref = records("csv.out.jsonl"), records("jsonl.out.jsonl")
    assert len(got) == 4 and len(ref) == 3
    for g, r in zip(got[:3], ref):
        assert g.keys() == r.keys()
        for key in r:
            if key != "input_sha":  # a fingerprint of the row's or line's own bytes: the two inputs differ there
                assert g[key] == r[key], key
        assert isinstance(g["input_sha"], str) and g["input_sha"]
    assert got[3]["line"] == 5 and got[3]["error"] == "row 5: expected image,question[,answer], got 1 field(s)"
    assert json.loads((tmp_path / "csv.out.run.json").read_text())["format"] == "csv"

    # Interrupted after two records, a CSV run resumes like any other: the same four records, once each.
    out = tmp_path / "csv.out.jsonl"
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:2]))
    res = CliRunner().invoke(app, ["run", str(csv_path), "--preset", str(preset), "--out", str(out), "--resume", "-q"])
    assert res.exit_code == 1, res.output
    assert records("csv.out.jsonl") == got
