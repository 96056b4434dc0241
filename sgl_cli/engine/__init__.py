"""The sgl engine as a library: what every `sgl` command does, from Python.

    from sgl_cli.engine import Engine, Run, load_preset, read_items

    summary = Run("batch.jsonl", load_preset("default").with_settings(retain=0.09)).execute()   # = sgl run
    engine = Engine.from_preset(load_preset("default"))
    for record in engine.run(read_items("batch.jsonl")):                                        # records only
        print(record["answer"])

Layout, lowest layer first (docs/design.md; tests/test_layering.py): `io/` (input items and formats, images,
output records), `core/` (the transformers seam, generation, capture, pruning), `families/` (one adapter per model
family), `guides/` (one module per ranking method, and their registry), `builtin/` (the shipped pair, the shapes
task, the published architectures), the settings (`preset`, `metrics`, `calibration`), `backends/` (the two models'
interfaces, `LargeBackend` and `SmallModel`, and their backends: transformers, vLLM, plugins), `pipeline/` (the
staged `Engine` and its records), `evaluation/` (the comparison of guides, eval, calibrate, `Bench`), `runs/`
(`Run`, the Ray backend), `views/` (inspect, report). Errors are `SglError` (the run cannot start) and `ItemError`
(one item's record).

Importing this package is cheap; torch and transformers load with the engine itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .builtin.pair import random_weights_warning
from .core.threads import use_threads
from .errors import ItemError, ModelLoadError, PresetError, SglError
from .guides import guide_names, make_guide
from .io.formats import read_items
from .io.images import to_rgb
from .io.items import ImageRef, Item, VideoRef
from .preset import ModelSpec, Preset, Settings, load_preset

if TYPE_CHECKING:
    from .calibration import PURPOSES, apply_calibration, resolve_calibration
    from .pipeline.engine import Engine, LargeInputs
    from .pipeline.stages import Encoded, LargeAnswer, SmallPass, Work
    from .evaluation.bench import Bench
    from .evaluation.calibrate import Calibrator
    from .evaluation.compare import Comparison
    from .backends.base import LargeBackend, SmallModel
    from .guides.base import Guide, GuideBatch, GuideItem, Kind
    from .runs.run import Run, RunSummary

# Loaded on first use (they import torch).
_LAZY = {
    "Engine": ".pipeline.engine", "LargeInputs": ".pipeline.engine",
    "Encoded": ".pipeline.stages", "LargeAnswer": ".pipeline.stages", "SmallPass": ".pipeline.stages",
    "Work": ".pipeline.stages",
    "Bench": ".evaluation.bench", "Calibrator": ".evaluation.calibrate", "Comparison": ".evaluation.compare",
    "apply_calibration": ".calibration", "resolve_calibration": ".calibration", "PURPOSES": ".calibration",
    "Guide": ".guides.base", "GuideBatch": ".guides.base", "GuideItem": ".guides.base", "Kind": ".guides.base",
    "LargeBackend": ".backends.base", "SmallModel": ".backends.base",
    "Run": ".runs.run", "RunSummary": ".runs.run",
}

__all__ = ["PURPOSES", "Bench", "Calibrator", "Comparison", "Encoded", "Engine", "Guide", "GuideBatch", "GuideItem",
           "ImageRef", "Item", "ItemError", "Kind", "LargeAnswer", "LargeBackend", "LargeInputs", "ModelLoadError",
           "ModelSpec", "Preset", "PresetError", "Run", "RunSummary", "Settings", "SglError", "SmallModel", "SmallPass",
           "VideoRef", "Work", "apply_calibration", "guide_names", "load_preset", "make_guide",
           "random_weights_warning", "read_items", "resolve_calibration", "to_rgb", "use_threads"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
