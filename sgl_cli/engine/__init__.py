"""The sgl engine as a library: what every `sgl` command does, from Python.

    from sgl_cli.engine import Engine, Run, load_preset, read_items

    summary = Run("batch.jsonl", load_preset("default").with_settings(retain=0.09)).execute()   # = sgl run
    engine = Engine.from_preset(load_preset("default"))
    for record in engine.run(read_items("batch.jsonl")):                                        # records only
        print(record["answer"])

Layout: `core/` (loading, the transformers seam, generation, capture, pruning, the staged `Engine`), `families/`
(one adapter per model family), `guides/` (one module per ranking method, and the plugin registry), `io/` (input
items, images, output records, `Run`, the Ray backend), `evaluation/` (metrics, calibration, the comparison of
guides, `Bench`), `builtin/` (the shipped pair and the shapes task), `views/` (inspect's terminal and PNG views,
plots). Errors are `SglError` (the run cannot start) and `ItemError` (one item's record).

Importing this package is cheap; torch and transformers load with the engine itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import ItemError, ModelLoadError, PresetError, SglError
from .guides import guide_names, make_guide
from .io.formats import read_items
from .io.images import to_rgb
from .io.items import ImageRef, Item
from .preset import ModelSpec, Preset, Settings, load_preset

if TYPE_CHECKING:
    from .calibration import PURPOSES, apply_calibration, resolve_calibration
    from .pipeline.engine import Engine, LargeInputs
    from .pipeline.stages import Encoded, LargeAnswer, SmallPass, Work
    from .evaluation.bench import Bench
    from .evaluation.calibrate import Calibrator
    from .evaluation.compare import Comparison
    from .guides.base import Guide, GuideBatch, GuideItem
    from .runs.run import Run, RunSummary

# Loaded on first use (they import torch).
_LAZY = {
    "Engine": ".pipeline.engine", "LargeInputs": ".pipeline.engine",
    "Encoded": ".pipeline.stages", "LargeAnswer": ".pipeline.stages", "SmallPass": ".pipeline.stages", "Work": ".pipeline.stages",
    "Bench": ".evaluation.bench", "Calibrator": ".evaluation.calibrate", "Comparison": ".evaluation.compare",
    "apply_calibration": ".calibration", "resolve_calibration": ".calibration", "PURPOSES": ".calibration",
    "Guide": ".guides.base", "GuideBatch": ".guides.base", "GuideItem": ".guides.base",
    "Run": ".runs.run", "RunSummary": ".runs.run",
}

__all__ = ["PURPOSES", "Bench", "Calibrator", "Comparison", "Encoded", "Engine", "Guide", "GuideBatch", "GuideItem", "ImageRef", "Item",
           "ItemError", "LargeAnswer", "LargeInputs", "ModelLoadError", "ModelSpec", "Preset", "PresetError", "Run",
           "RunSummary", "Settings", "SglError", "SmallPass", "Work", "apply_calibration", "guide_names", "resolve_calibration",
           "load_preset", "make_guide", "read_items", "to_rgb"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
