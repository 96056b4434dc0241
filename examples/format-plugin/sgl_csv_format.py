"""A CSV input format for sgl: `image,question[,answer]` per row, no header; image paths relative to the file.

Registered under the `sgl.formats` entry-point group (pyproject.toml), `sgl run data.csv` reads it like a built-in
format: each row is one item, numbered by its row, and a bad row is an error record that names it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

from sgl_cli.engine.io.formats import Format
from sgl_cli.engine.io.items import ImageRef, Item, parse_fields


class CsvFormat(Format):
    name = "csv"
    unit = "row"

    def recognise(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".csv"

    def pairs(self, source) -> Iterator[tuple[int, Any]]:
        with source.path.open(newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.reader(f), 1):
                if any(cell.strip() for cell in row):  # blank rows hold no item
                    yield number, row

    def parse(self, source, number: int, payload: Any) -> Item:
        item = Item(line=number, id=number, unit=self.unit)
        if len(payload) not in (2, 3):
            item.error = item.fail(f"expected image,question[,answer], got {len(payload)} field(s)")
            return item
        fields = {"question": payload[1]}
        if len(payload) == 3 and payload[2].strip():
            fields["answer"] = payload[2].strip()
        item = parse_fields(fields, item)
        if not payload[0].strip():
            item.error = item.error or item.fail("the image field is empty")
        else:
            item.images = [ImageRef.parse(payload[0].strip(), source.base)]
        return item
