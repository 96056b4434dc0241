"""Choosing the early-exit threshold from labelled calibration items.

A small VLM answers every item and reports an ``exit_score``; when
``exit_score >= threshold`` its answer is kept ("exit"), otherwise the large model
answers.  From per-item correctness of both models we tabulate every distinct
threshold (one operating point each), pick one for an accuracy or exit-rate target,
and save the choice as a YAML file with a fingerprint of the models and settings it
is valid for (:func:`fingerprint`), which a run checks before it uses the threshold.

Thresholds are always exit-score values seen in the data, plus one just above the
largest score (``nextafter(max, inf)``, which exits nothing and keeps the output
free of ``inf``).  They are stored unrounded: rounding a threshold to a few
decimals could move it across a score and change which items exit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .metrics import METRICS

# Relative accuracy reported when the large model gets nothing right but the mixed
# system does: the ratio is unbounded, so use the largest accepted target, which
# such a point meets (an unbounded improvement meets any target).
MAX_TARGET_ACCURACY = 2.0
_EPS = 1e-12  # slack for float comparisons of rates and ratios
_DECIMALS = 6  # rounding of reported statistics (not thresholds) in YAML output

# Keys a calibration file must have for a run to apply it; the rest is reporting.
REQUIRED_KEYS = ("version", "threshold", "metric", "target", "n_items", "fingerprint")
VERSION = 1


@dataclass(frozen=True)
class Outcome:
    """One labelled calibration item."""

    exit_score: float
    small_correct: float  # metric value of the small model's answer, 0..1
    large_correct: float  # metric value of the large model's answer, 0..1

    def __post_init__(self) -> None:
        if not math.isfinite(self.exit_score):
            raise ValueError(f"exit_score must be finite, got {self.exit_score!r}")
        for name in ("small_correct", "large_correct"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Point:
    """The mixed system at one threshold."""

    threshold: float
    exit_rate: float  # fraction of items answered by the small model alone
    accuracy: float  # mean correctness of the mixed system
    relative_accuracy: float  # accuracy / large-model accuracy on the same items
    relative_compute: float  # compute / compute of the large model on every item
    n_exit: int


@dataclass(frozen=True)
class Choice:
    point: Point
    met: bool
    target: dict[str, float]
    message: str
    interval: tuple[float, float]  # bootstrap 95% interval of point.accuracy
    n_items: int


def _arrays(outcomes: Sequence[Outcome]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not outcomes:
        raise ValueError("no labelled items: calibration needs items with reference answers")
    data = np.array([(o.exit_score, o.small_correct, o.large_correct) for o in outcomes], float)
    return data[:, 0], data[:, 1], data[:, 2]


def _relative(accuracy: float, large_accuracy: float) -> float:
    if large_accuracy > 0:
        return accuracy / large_accuracy
    return 1.0 if accuracy == 0 else MAX_TARGET_ACCURACY


def operating_points(
    outcomes: Sequence[Outcome], relative_cost_small: float = 0.0
) -> list[Point]:
    """One point per distinct exit score, plus one that exits nothing; ascending threshold.

    ``relative_cost_small`` is the small model's cost as a fraction of the large
    model's; it is paid on every item because the small model always runs.
    """
    if not (math.isfinite(relative_cost_small) and relative_cost_small >= 0):
        raise ValueError(f"relative_cost_small must be >= 0, got {relative_cost_small!r}")
    scores, small, large = _arrays(outcomes)
    n = len(scores)
    order = np.argsort(scores, kind="stable")
    scores, small, large = scores[order], small[order], large[order]
    thresholds = np.append(np.unique(scores), np.nextafter(scores[-1], np.inf))
    # Items from index `first` on have score >= threshold and exit.
    first = np.searchsorted(scores, thresholds, side="left")
    cum_small = np.concatenate(([0.0], np.cumsum(small)))
    cum_large = np.concatenate(([0.0], np.cumsum(large)))
    accuracy = (cum_small[n] - cum_small[first] + cum_large[first]) / n
    # Same expression as the exit-nothing accuracy, so that point is exactly 1.0.
    large_accuracy = float(cum_large[n] / n)
    return [
        Point(
            threshold=t,
            exit_rate=(n - f) / n,
            accuracy=a,
            relative_accuracy=_relative(a, large_accuracy),
            relative_compute=f / n + relative_cost_small,
            n_exit=n - f,
        )
        # tolist(): plain Python numbers, so Points print and serialise cleanly
        for t, f, a in zip(thresholds.tolist(), first.tolist(), accuracy.tolist())
    ]


def _bootstrap_interval(
    correct: np.ndarray, n_boot: int, seed: int
) -> tuple[float, float]:
    # Resampling n items with replacement is a multinomial draw over the distinct
    # correctness values: same distribution, memory independent of n.
    values, counts = np.unique(correct, return_counts=True)
    n = len(correct)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_boot)
    lo, hi = np.percentile(draws @ values / n, [2.5, 97.5])
    return float(lo), float(hi)


def _describe(p: Point) -> str:
    return (
        f"threshold {p.threshold:.6g} (exit rate {p.exit_rate:.1%}, "
        f"{p.relative_accuracy:.3f} x large accuracy, relative compute {p.relative_compute:.2f})"
    )


def validate_target(target_accuracy: float | None, exit_rate: float | None) -> None:
    """ValueError unless exactly one valid target is given (checked before any model runs)."""
    if (target_accuracy is None) == (exit_rate is None):
        raise ValueError("give exactly one of target_accuracy or exit_rate")
    if target_accuracy is not None and not 0 < target_accuracy <= MAX_TARGET_ACCURACY:
        raise ValueError(
            f"target_accuracy is a fraction of the large model's accuracy and must be "
            f"in (0, {MAX_TARGET_ACCURACY:g}], got {target_accuracy!r}"
        )
    if exit_rate is not None and not 0 <= exit_rate <= 1:
        raise ValueError(f"exit_rate must be in [0, 1], got {exit_rate!r}")


def choose_threshold(
    outcomes: Sequence[Outcome],
    *,
    target_accuracy: float | None = None,
    exit_rate: float | None = None,
    relative_cost_small: float = 0.0,
    n_boot: int = 1000,
    seed: int = 0,
) -> Choice:
    """Pick a threshold for exactly one target.

    ``target_accuracy=A``: the lowest threshold (most exits) whose mixed accuracy is
    at least A x the large model's.  ``exit_rate=E``: the highest exit rate not above
    E; ``met`` is False when tied scores make it lower than the 1/n granularity allows.
    """
    validate_target(target_accuracy, exit_rate)
    points = operating_points(outcomes, relative_cost_small)
    n = len(outcomes)
    if target_accuracy is not None:
        target = {"target_accuracy": float(target_accuracy)}
        meeting = [p for p in points if p.relative_accuracy >= target_accuracy - _EPS]
        met = bool(meeting)
        # max() keeps the first of equal values, i.e. the lowest threshold.
        point = meeting[0] if met else max(points, key=lambda p: p.relative_accuracy)
        if met:
            message = f"target {target_accuracy:g} x large accuracy met at {_describe(point)}"
        else:
            message = (
                f"target {target_accuracy:g} x large accuracy cannot be met; best achievable "
                f"is {point.relative_accuracy:.3f} at {_describe(point)}"
            )
    else:
        target = {"exit_rate": float(exit_rate)}
        # Exit rate falls as the threshold rises: the first point under E is closest.
        point = next(p for p in points if p.exit_rate <= exit_rate + _EPS)
        met = point.n_exit == math.floor(exit_rate * n + 1e-9)
        if met:
            closest = "" if abs(point.exit_rate - exit_rate) < _EPS else f", as closely as {n} items allow,"
            message = f"exit rate {exit_rate:.1%} reached{closest} at {_describe(point)}"
        else:
            message = (
                f"exit rate {exit_rate:.1%} cannot be reached because of tied exit scores; "
                f"closest below is {_describe(point)}"
            )

    scores, small, large = _arrays(outcomes)
    correct = np.where(scores >= point.threshold, small, large)
    interval = _bootstrap_interval(correct, n_boot, seed)
    return Choice(point=point, met=met, target=target, message=message,
                  interval=interval, n_items=n)


def _round(x: float) -> float:
    return round(float(x), _DECIMALS)


def to_yaml_dict(
    choice: Choice,
    points: Sequence[Point],
    *,
    metric: str,
    fingerprint: dict[str, Any],
    n_items: int,
    relative_cost_small: float = 0.0,
) -> dict[str, Any]:
    """The calibration file's content, as plain Python types for ``yaml.safe_dump``.

    ``relative_cost_small`` is the value the points' ``relative_compute`` was computed with.
    """
    p = choice.point
    return {
        "version": VERSION,
        "threshold": float(p.threshold),
        "target": {k: float(v) for k, v in choice.target.items()},
        "met": bool(choice.met),
        "metric": str(metric),
        "n_items": int(n_items),
        "exit_rate": _round(p.exit_rate),
        "accuracy": _round(p.accuracy),
        "relative_accuracy": _round(p.relative_accuracy),
        "relative_compute": _round(p.relative_compute),
        "accuracy_interval": [_round(choice.interval[0]), _round(choice.interval[1])],
        # The exit-nothing point (highest threshold) is the large model alone.
        "large_accuracy": _round(max(points, key=lambda q: q.threshold).accuracy),
        "relative_cost_small": _round(relative_cost_small),
        "fingerprint": dict(fingerprint),
        "table": [
            {
                "threshold": float(q.threshold),
                "exit_rate": _round(q.exit_rate),
                "accuracy": _round(q.accuracy),
                "relative_accuracy": _round(q.relative_accuracy),
                "relative_compute": _round(q.relative_compute),
            }
            for q in points
        ],
    }


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read a calibration file written from :func:`to_yaml_dict`, checking what a run needs."""
    from ..safe_yaml import load_yaml

    data = load_yaml(path)  # YamlError is a ValueError naming the file
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a calibration file must be a mapping of keys")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s): {', '.join(missing)}")

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{path}: bad value for key {key!r}: expected {expected}, "
                          f"got {data[key]!r}")

    if data["version"] != VERSION:
        raise bad("version", str(VERSION))
    threshold = data["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold):
        raise bad("threshold", "a finite number")
    if data["metric"] not in METRICS:
        raise bad("metric", f"one of {', '.join(sorted(METRICS))}")
    if not isinstance(data["target"], dict):
        raise bad("target", "a mapping")
    if isinstance(data["n_items"], bool) or not isinstance(data["n_items"], int) \
            or data["n_items"] < 1:
        raise bad("n_items", "a positive integer")
    if not isinstance(data["fingerprint"], dict):
        raise bad("fingerprint", "a mapping")
    return data


# Written above the YAML so that the file explains itself to whoever opens it.
_HEADER = """\
# sgl calibration, written by `sgl calibrate`; `sgl run --calibration FILE` uses `threshold` when the run's
# settings match `fingerprint`. accuracy: the mixed system (the small model's answer where exit_score >=
# threshold, the large model's otherwise) under `metric`; relative_accuracy = accuracy / large_accuracy;
# accuracy_interval: 95% bootstrap interval of accuracy over the n_items; relative_compute = (1 - exit_rate)
# + relative_cost_small, as a fraction of running the large model on every item; relative_cost_small: the
# small model's median time per item (answer and consistency re-read) / the large model's, measured on this set.
"""


def save_calibration(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(_HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
