"""The calibration file `sgl calibrate` writes (the choice it records is made in `operating_points`; reading a file
and resolving it for a run is `engine/calibration.py`).

Version 2 (this one) names the chosen operating point: `retain`, `prune_layer` and `threshold` at the top, the
`chosen` row, and a `table` of (retain, threshold) rows: per retain, the thresholds nearest each whole
percent of exit rate and the chosen one (every distinct exit score is a candidate, but a file that grew with the
labelled set would be slow to read at every run start); its `fingerprint` (what the file is valid for)
has no retain, since the file covers the retain values of its table. Version 1 files (one retain, named in the
fingerprint; no `retain` at the top) are still read: they are valid for that one retain, and their `chosen` row
is made from their top-level statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..calibration import VERSION
from .operating_points import Choice, Costs, Point

_DECIMALS = 6  # rounding of reported statistics (not thresholds or retains)


def _round(x: float) -> float:
    return round(float(x), _DECIMALS)


def row(p: Point) -> dict[str, float]:
    """A table row: the point's retain and threshold unrounded, its statistics rounded."""
    out = {"retain": float(p.retain), "threshold": float(p.threshold), "exit_rate": _round(p.exit_rate),
           "accuracy": _round(p.accuracy), "relative_accuracy": _round(p.relative_accuracy),
           "relative_compute": _round(p.relative_compute)}
    if p.relative_accuracy_lower is not None:
        out["relative_accuracy_lower"] = _round(p.relative_accuracy_lower)
    return out


def to_yaml_dict(choice: Choice, *, metric: str, fingerprint: dict[str, Any], prune_layer: int, costs: Costs,
                 retains: list[float], stage_ms: dict[str, Any] | None = None) -> dict[str, Any]:
    """The calibration file's content, as plain Python types for `save_calibration`. `costs` are the stage costs
    the table's relative compute was computed from (relative to the large model alone: `stage_cost`);
    `stage_ms`, for the reader, the median times (`small`, `large`, `pruned` by retain)."""
    p = choice.point
    ms = {} if stage_ms is None else {"stage_ms": {
        "small": _round(stage_ms["small"]), "large": _round(stage_ms["large"]),
        "pruned": {float(r): _round(v) for r, v in stage_ms["pruned"].items()}}}
    return {
        "version": VERSION,
        "retain": float(p.retain),
        "prune_layer": int(prune_layer),
        "threshold": float(p.threshold),
        "target": {k: float(v) for k, v in choice.target.items()},
        "met": bool(choice.met),
        "metric": str(metric),
        "n_items": int(choice.n_items),
        "chosen": row(p),
        "accuracy_interval": [_round(choice.interval[0]), _round(choice.interval[1])],
        "large_accuracy": _round(choice.large_accuracy),
        "small_accuracy": _round(choice.small_accuracy),
        "stage_cost": {"small": _round(costs.small / costs.large),
                       "pruned": {float(r): _round(costs.at(r) / costs.large) for r in retains}},
        **ms,
        "retains": [float(r) for r in retains],
        "fingerprint": dict(fingerprint),
        "table": [row(q) for q in file_points(choice)],
    }


def file_points(choice: Choice, steps: int = 100) -> list[Point]:
    """The rows the file keeps: at every retain the same thresholds, those whose exit rate is nearest each of
    0, 1/steps, ..., 1, and the chosen one, so at most steps + 2 rows per retain whatever the labelled set's size."""
    import numpy as np

    same = [p for p in choice.points if p.retain == choice.point.retain]  # the exit rate is the same at every retain
    rates = np.array([p.exit_rate for p in same])
    nearest = np.abs(rates[None, :] - np.linspace(0, 1, steps + 1)[:, None]).argmin(axis=1)
    keep = {choice.point.threshold, *(same[i].threshold for i in nearest.tolist())}
    return [p for p in choice.points if p.threshold in keep]


# Written above the YAML so that the file explains itself to whoever opens it.
_HEADER = """\
# sgl calibration, written by `sgl calibrate`. `sgl run --calibration FILE` runs with `retain` and `threshold`
# when the run's models and settings match `fingerprint` (explicit --retain/--threshold win). Each `table` row is
# one operating point: the small model's answer where exit_score >= threshold, otherwise the large model's from
# the top `retain` of the visual tokens. accuracy: that mixed system's, under `metric`; relative_accuracy =
# accuracy / large_accuracy (the large model alone, every visual token); relative_accuracy_lower: its bootstrap
# lower bound at target.confidence; relative_compute = stage_cost.small + (1 - exit_rate) x stage_cost.pruned at
# retain, where a stage's cost is the median over the items of its time relative to the large model alone on the
# same item, measured on this machine (stage_ms: the median times). `chosen` is the row chosen for `target`;
# accuracy_interval: the 95% bootstrap interval of its accuracy over the n_items.
"""


def save_calibration(data: dict[str, Any], path: str | Path) -> None:
    """Write `data` (from `to_yaml_dict`) with the header; the table one row per line."""
    head = {k: v for k, v in data.items() if k != "table"}
    text = _HEADER + yaml.safe_dump(head, sort_keys=False, allow_unicode=True)
    if "table" in data:
        text += "table:\n" + "".join(
            "- " + yaml.safe_dump(r, default_flow_style=True, sort_keys=False, width=1 << 16) for r in data["table"])
    Path(path).write_text(text)
