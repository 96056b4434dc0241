"""Choosing the operating point, a retain ratio and an early-exit threshold together, from labelled items.

The small VLM answers every item and reports an ``exit_score``; when ``exit_score >= threshold`` its answer is
kept ("exit"), otherwise the large VLM answers from the top ``retain`` of the visual tokens. From each item's
correctness under the small model, the large model alone and the large model at every retain of a grid
(:class:`Outcome`), every (retain, threshold) pair is an operating point (:class:`Point`): its exit rate, the
mixed system's accuracy, that accuracy relative to the large model alone, and its compute relative to the large
model alone on every item, from measured stage times (:class:`Costs`). :func:`choose` takes the cheapest point
that meets an accuracy target (or whose bootstrap lower bound does, with ``confidence``), or the most accurate
point at a target exit rate. The file format is in ``calibration``.

Thresholds are exit-score values seen in the data, plus one just above the largest score
(``nextafter(max, inf)``, which exits nothing and keeps the output free of ``inf``); the exit decision does not
depend on retain, so every retain has the same thresholds. They are stored unrounded: rounding a threshold to a
few decimals could move it across a score and change which items exit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


# Relative accuracy reported when the large model gets nothing right but the mixed system does: the ratio is
# unbounded, so use the largest accepted target, which such a point meets (an unbounded improvement meets any).
MAX_TARGET_ACCURACY = 2.0
_EPS = 1e-12  # slack for float comparisons of rates and ratios
_BOOT_BLOCK = 100  # bootstrap resamples evaluated at a time (memory: block x items)


@dataclass(frozen=True)
class Outcome:
    """One labelled calibration item: the metric value (0..1) of each model's answer."""

    exit_score: float
    small_correct: float
    large_correct: float  # the large model alone, every visual token
    pruned_correct: Mapping[float, float] = field(default_factory=dict)  # retain -> the large model from its top

    def __post_init__(self) -> None:
        if not math.isfinite(self.exit_score):
            raise ValueError(f"exit_score must be finite, got {self.exit_score!r}")
        for name, value in [("small_correct", self.small_correct), ("large_correct", self.large_correct),
                            *((f"pruned_correct[{r:g}]", v) for r, v in self.pruned_correct.items())]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")

    def at(self, retain: float) -> float:
        """Correctness of the large model at `retain` (retain 1 drops nothing: the large model alone)."""
        if retain in self.pruned_correct:
            return self.pruned_correct[retain]
        if retain >= 1.0:
            return self.large_correct
        raise ValueError(f"no answer of the large model at retain {retain:g} for this item")


@dataclass(frozen=True)
class Costs:
    """Measured cost per item, in any one unit: the small model's pass (answer and SEE re-read), the large model
    alone, and the large model at each retain (vision tower included). `paired` makes them from times measured
    item by item."""

    small: float
    large: float
    pruned: Mapping[float, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.large) and self.large > 0):
            raise ValueError(f"the large model's time must be > 0, got {self.large!r}")
        if any(not (math.isfinite(v) and v >= 0) for v in (self.small, *self.pruned.values())):
            raise ValueError("stage times must be >= 0")

    @classmethod
    def paired(cls, small: Sequence[float], large: Sequence[float],
               pruned: Mapping[float, Sequence[float]]) -> "Costs":
        """From times per item (`small`, `large` and each `pruned[retain]` aligned item by item): each stage's
        median over the items of its time relative to the large model alone on the same item (so large = 1).
        Paired, so that the machine's load, which drifts over a run, cancels; medians, so that warm-up does not
        count."""
        def median_ratio(times: Sequence[float]) -> float:
            ratios = [t / a for t, a in zip(times, large) if a > 0]
            return float(np.median(ratios)) if ratios else 0.0

        return cls(median_ratio(small), 1.0, {r: median_ratio(times) for r, times in pruned.items()})

    def at(self, retain: float) -> float:
        if retain in self.pruned:
            return self.pruned[retain]
        if retain >= 1.0:
            return self.large
        raise ValueError(f"no measured time of the large model at retain {retain:g}")

    def relative(self, retain: float, exit_rate: float) -> float:
        """(small pass + (1 - exit rate) x the large model at `retain`) / the large model alone."""
        return (self.small + (1.0 - exit_rate) * self.at(retain)) / self.large


@dataclass(frozen=True)
class Point:
    """The mixed system at one retain and threshold."""

    retain: float
    threshold: float
    exit_rate: float  # fraction of items answered by the small model alone
    accuracy: float  # mean correctness of the mixed system
    relative_accuracy: float  # accuracy / the large model alone's accuracy on the same items
    relative_compute: float  # Costs.relative: 1 = the large model alone on every item
    n_exit: int
    relative_accuracy_lower: float | None = None  # its bootstrap lower bound at the confidence asked for


@dataclass(frozen=True)
class Choice:
    point: Point
    met: bool
    target: dict[str, float]  # {"target_accuracy": A} or {"exit_rate": E}, and "confidence" when given
    message: str
    interval: tuple[float, float]  # bootstrap 95% interval of point.accuracy
    n_items: int
    points: list[Point]  # the whole table: retain descending, threshold ascending
    best: dict[float, Point]  # per retain, its best point for the target (the chosen one is among them)
    large_accuracy: float
    small_accuracy: float


def _relative(accuracy, large_accuracy):
    """accuracy / large_accuracy, elementwise; 1 when both are 0, MAX_TARGET_ACCURACY when only large is."""
    accuracy, large_accuracy = np.asarray(accuracy, float), np.asarray(large_accuracy, float)
    safe = np.where(large_accuracy > 0, large_accuracy, 1.0)
    return np.where(large_accuracy > 0, accuracy / safe, np.where(accuracy == 0, 1.0, MAX_TARGET_ACCURACY))


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) resampling counts: how often each item is drawn in each resample of n items."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def operating_points(outcomes: Sequence[Outcome], costs: Costs, retains: Sequence[float], *,
                     confidence: float | None = None, n_boot: int = 1000, seed: int = 0) -> list[Point]:
    """Every (retain, threshold) pair: per retain (in the order given), one point per distinct exit score and
    one that exits nothing, ascending threshold. With `confidence`, each point also gets the lower bound of its
    relative accuracy: the (1 - confidence) quantile over `n_boot` resamples of the items (the same resamples
    for every point, drawn over the items in ascending exit-score order)."""
    if not outcomes:
        raise ValueError("no labelled items: calibration needs items with reference answers")
    if not retains:
        raise ValueError("no retain values to calibrate")
    items = sorted(outcomes, key=lambda o: o.exit_score)  # stable: ties keep their input order
    n = len(items)
    scores = np.array([o.exit_score for o in items])
    small = np.array([o.small_correct for o in items])
    large = np.array([o.large_correct for o in items])
    thresholds = np.append(np.unique(scores), np.nextafter(scores[-1], np.inf))
    # Items from index `first` on have score >= threshold and exit.
    first = np.searchsorted(scores, thresholds, side="left")
    cum_small = np.concatenate(([0.0], np.cumsum(small)))
    large_accuracy = large_accuracy_of(items)
    counts = bootstrap_counts(n, n_boot, seed) if confidence is not None else None
    points = []
    for retain in retains:
        pruned = np.array([o.at(retain) for o in items])
        cum = np.concatenate(([0.0], np.cumsum(pruned)))
        accuracy = (cum_small[n] - cum_small[first] + cum[first]) / n
        relative = _relative(accuracy, large_accuracy)
        lower = _lower_bounds(counts, small, large, pruned, first, confidence) if counts is not None else None
        for i, (t, f, a, r) in enumerate(zip(thresholds.tolist(), first.tolist(), accuracy.tolist(),
                                             relative.tolist())):
            exit_rate = (n - f) / n
            points.append(Point(float(retain), t, exit_rate, a, r, costs.relative(retain, exit_rate), n - f,
                                None if lower is None else float(lower[i])))
    return points


def large_accuracy_of(outcomes: Sequence[Outcome]) -> float:
    """The large model alone's accuracy, summed as the points' accuracies are (so the exit-nothing point at
    retain 1 is exactly 1.0 relative)."""
    items = sorted(outcomes, key=lambda o: o.exit_score)
    return float(np.cumsum([o.large_correct for o in items])[-1] / len(items))


def _lower_bounds(counts: np.ndarray, small: np.ndarray, large: np.ndarray, pruned: np.ndarray,
                  first: np.ndarray, confidence: float) -> np.ndarray:
    """Per threshold, the (1 - confidence) quantile of the relative accuracy over the resamples `counts`."""
    n = len(small)
    rel = np.empty((len(counts), len(first)))
    for b in range(0, len(counts), _BOOT_BLOCK):
        w = counts[b:b + _BOOT_BLOCK]
        cs = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w * small, axis=1)], axis=1)
        cp = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w * pruned, axis=1)], axis=1)
        accuracy = (cs[:, [n]] - cs[:, first] + cp[:, first]) / n
        rel[b:b + len(w)] = _relative(accuracy, (w @ large / n)[:, None])
    return np.quantile(rel, 1.0 - confidence, axis=0)


def _bootstrap_interval(correct: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    # Resampling n items with replacement is a multinomial draw over the distinct correctness values: same
    # distribution, memory independent of n.
    values, counts = np.unique(correct, return_counts=True)
    n = len(correct)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_boot)
    lo, hi = np.percentile(draws @ values / n, [2.5, 97.5])
    return float(lo), float(hi)


def describe(p: Point) -> str:
    lower = "" if p.relative_accuracy_lower is None else f" (lower bound {p.relative_accuracy_lower:.3f})"
    return (f"retain {p.retain:g}, threshold {p.threshold:.6g} (exit rate {p.exit_rate:.1%}, "
            f"{p.relative_accuracy:.3f} x large accuracy{lower}, relative compute {p.relative_compute:.2f})")


def validate_target(target_accuracy: float | None, exit_rate: float | None,
                    confidence: float | None = None) -> None:
    """A SettingError (a ValueError) unless exactly one valid target is given (checked before any model runs)."""
    from ..errors import SettingError

    if (target_accuracy is None) == (exit_rate is None):
        raise SettingError("give exactly one of {} or {}", "target_accuracy", "exit_rate")
    if target_accuracy is not None and not 0 < target_accuracy <= MAX_TARGET_ACCURACY:
        raise SettingError(f"{{}} is a fraction of the large model's accuracy and must be in "
                           f"(0, {MAX_TARGET_ACCURACY:g}], got {target_accuracy!r}", "target_accuracy")
    if exit_rate is not None and not 0 <= exit_rate <= 1:
        raise SettingError(f"{{}} must be in [0, 1], got {exit_rate!r}", "exit_rate")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise SettingError(f"{{}} must be in [0.5, 1), got {confidence!r}", "confidence")


def choose(outcomes: Sequence[Outcome], costs: Costs, retains: Sequence[float], *,
           target_accuracy: float | None = None, exit_rate: float | None = None, confidence: float | None = None,
           n_boot: int = 1000, seed: int = 0) -> Choice:
    """The operating point for exactly one target.

    ``target_accuracy=A``: the cheapest point (lowest relative compute; ties: the more accurate, then the larger
    retain) whose relative accuracy, or with ``confidence`` its bootstrap lower bound, is at least A. When no
    point meets A, the most accurate one (ties: the cheapest), and ``met`` is False.
    ``exit_rate=E``: the highest exit rate not above E (the threshold is the same at every retain), and there
    the most accurate retain (ties: the cheapest); ``met`` is False when tied scores make the exit rate lower
    than the 1/n granularity allows.
    """
    validate_target(target_accuracy, exit_rate, confidence)
    points = operating_points(outcomes, costs, retains, confidence=confidence, n_boot=n_boot, seed=seed)
    n = len(outcomes)

    def value(p: Point) -> float:  # what the target is checked on
        return p.relative_accuracy if confidence is None else p.relative_accuracy_lower

    def cheapest(ps):
        return min(ps, key=lambda p: (p.relative_compute, -value(p), -p.retain))

    def best_value(ps):
        return min(ps, key=lambda p: (-value(p), p.relative_compute, -p.retain))

    by_retain = {r: [p for p in points if p.retain == r] for r in dict.fromkeys(p.retain for p in points)}
    bound = "" if confidence is None else f" (the lower bound at confidence {confidence:g})"
    if target_accuracy is not None:
        target = {"target_accuracy": float(target_accuracy)}

        def meets(p: Point) -> bool:
            return value(p) >= target_accuracy - _EPS

        best = {r: cheapest([p for p in ps if meets(p)]) if any(map(meets, ps)) else best_value(ps)
                for r, ps in by_retain.items()}
        meeting = [p for p in best.values() if meets(p)]
        met = bool(meeting)
        point = cheapest(meeting) if met else best_value(best.values())
        if met:
            message = f"target {target_accuracy:g} x large accuracy{bound} met most cheaply at {describe(point)}"
        else:
            message = (f"target {target_accuracy:g} x large accuracy{bound} cannot be met; best achievable is "
                       f"{value(point):.3f} at {describe(point)}")
    else:
        target = {"exit_rate": float(exit_rate)}
        first_retain = next(iter(by_retain.values()))
        # Exit rate falls as the threshold rises: the first point under E is the closest.
        threshold = next(p for p in first_retain if p.exit_rate <= exit_rate + _EPS).threshold
        best = {r: next(p for p in ps if p.threshold == threshold) for r, ps in by_retain.items()}
        point = best_value(best.values())
        met = point.n_exit == math.floor(exit_rate * n + 1e-9)
        if met:
            closest = "" if abs(point.exit_rate - exit_rate) < _EPS else f", as closely as {n} items allow,"
            message = f"exit rate {exit_rate:.1%} reached{closest} most accurately at {describe(point)}"
        else:
            message = (f"exit rate {exit_rate:.1%} cannot be reached because of tied exit scores; closest below "
                       f"is {describe(point)}")
    if confidence is not None:
        target["confidence"] = float(confidence)

    scores = np.array([o.exit_score for o in outcomes])
    small = np.array([o.small_correct for o in outcomes])
    pruned = np.array([o.at(point.retain) for o in outcomes])
    interval = _bootstrap_interval(np.where(scores >= point.threshold, small, pruned), n_boot, seed)
    return Choice(point=point, met=met, target=target, message=message, interval=interval, n_items=n,
                  points=points, best=best, large_accuracy=large_accuracy_of(outcomes),
                  small_accuracy=float(small.sum() / n))
