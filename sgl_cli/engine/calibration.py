"""Calibration files at the settings layer: reading one, what it is valid for, and resolving it into a preset.

A calibration file (`sgl calibrate` writes it: `evaluation/calibration.py`) is valid for the models and every
setting that changes answers or exit scores: its `fingerprint` (`calibration_fingerprint`: the run's `fingerprint`
without retain, since a file covers the retain values of its table; a version-1 file names its one retain there and
is valid for that retain only).

`resolve_calibration(preset, purpose)` is the one place a file meets a preset. What differs between its users is
one row of `PURPOSES`: which file is used, what must match, and which settings the preset takes from it (a setting
given explicitly, `with_settings`, always wins). `Run`, `Engine.from_preset`, `Evaluation` and `inspect` each call
it once; a new rule for a calibration goes into `PURPOSES` (or the two checks below it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import SglError
from .preset import ModelSpec, Preset


class CalibrationError(SglError):
    """A calibration file that cannot be used for this run."""

    setting = "calibration"


# -- what a file is valid for ------------------------------------------------------------------------------------
# The models and every setting that changes answers or exit scores. Not the threshold (the output), batch size
# (speed only) or dtype/device (the same model, numerically close).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(spec: ModelSpec) -> str:
    """A hub id (with its revision) as is; a local folder as a hash of its config and weight file sizes; a
    built-in model as its name and what fixes its weights.

    Hashing the weights themselves would read gigabytes; names and sizes change when the weights do,
    and the config catches a different model of the same size. A retrained built-in pair has the same
    sizes, but it is a few MB, so its files are hashed whole.
    """
    if spec.model.startswith("builtin:"):
        return spec.model + "#" + _builtin_digest(spec.model)
    folder = Path(spec.model)
    if not folder.is_dir():
        return spec.model + (f"@{spec.revision}" if spec.revision else "")
    digest = hashlib.sha256()
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for f in sorted(folder.iterdir()):
        if f.name.endswith(_WEIGHT_SUFFIXES):
            digest.update(f"\0{f.name}\0{f.stat().st_size}".encode())
    return f"folder:{digest.hexdigest()[:12]}"


def _builtin_digest(model: str) -> str:
    from .builtin.pair import SHIPPED, SPECS

    pair, _, role = model.removeprefix("builtin:").partition("/")
    if pair in SPECS:  # built on demand from a seeded spec: the spec's key fixes the weights
        return SPECS[pair].key()
    folder = SHIPPED.get(pair, Path()) / role
    digest = hashlib.sha256()
    for name in ("config.json", "SGL_BUILTIN.json", "model.safetensors"):
        f = folder / name
        digest.update(f.read_bytes() if f.is_file() else b"")
    return digest.hexdigest()[:12]


def fingerprint(preset: Preset) -> dict[str, Any]:
    s = preset.settings
    return {
        "small": model_fingerprint(preset.small) if preset.small is not None else None,
        "large": model_fingerprint(preset.large),
        "large_quantize": preset.large.quantize,  # 4-bit weights answer differently
        "guide": s.guide,
        "retain": s.retain,
        "prune_layer": s.prune_layer,
        "consistency_retain": s.consistency_retain,
        "prompt_suffix": s.prompt_suffix,
        "max_new_tokens": s.max_new_tokens,
    }


def calibration_fingerprint(preset: Preset) -> dict[str, Any]:
    """What a calibration over a grid of retain values is valid for: the run's fingerprint without retain."""
    return {k: v for k, v in fingerprint(preset).items() if k != "retain"}


def fingerprint_differences(calibrated: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs, one phrase per key: ``retain (calibrated 0.09, this run 0.2)``; empty when they match."""
    return [
        f"{key} (calibrated {calibrated.get(key)!r}, this run {current.get(key)!r})"
        for key in [*current, *(k for k in calibrated if k not in current)]
        if calibrated.get(key) != current.get(key)
    ]


# Settings a calibration's threshold does not depend on: the exit decision comes from the small model's pass alone.
EXIT_FREE = ("retain", "prune_layer", "guide")


# -- reading a file ----------------------------------------------------------------------------------------------
VERSION = 2
# Keys a calibration file must have for a run to apply it; the rest is reporting.
REQUIRED_KEYS = ("version", "threshold", "metric", "target", "n_items", "fingerprint")
ROW_KEYS = ("retain", "threshold", "exit_rate", "accuracy", "relative_accuracy", "relative_compute")


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read a calibration file (version 1 or 2), checking what a run needs; version 1 gains `chosen`."""
    from .metrics import METRICS
    from .safe_yaml import load_yaml

    data = load_yaml(path)  # bounded; YamlError is a ValueError naming the file
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a calibration file must be a mapping of keys")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s): {', '.join(missing)}")

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{path}: bad value for key {key!r}: expected {expected}, got {data[key]!r}")

    def number(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    if data["version"] not in (1, VERSION):
        raise bad("version", f"1 or {VERSION} (a newer sgl wrote it? upgrade sgl, or run `sgl calibrate` again)")
    if not number(data["threshold"]):
        raise bad("threshold", "a finite number")
    if data.get("retain") is not None and not (number(data["retain"]) and 0 < data["retain"] <= 1):
        raise bad("retain", "a number in (0, 1]")
    if data.get("prune_layer") is not None and (isinstance(data["prune_layer"], bool)
                                                 or not isinstance(data["prune_layer"], int)
                                                 or data["prune_layer"] < 0):
        raise bad("prune_layer", "an integer >= 0")
    if data["metric"] not in METRICS:
        raise bad("metric", f"one of {', '.join(sorted(METRICS))}")
    if not isinstance(data["target"], dict):
        raise bad("target", "a mapping")
    if isinstance(data["n_items"], bool) or not isinstance(data["n_items"], int) or data["n_items"] < 1:
        raise bad("n_items", "a positive integer")
    if not isinstance(data["fingerprint"], dict):
        raise bad("fingerprint", "a mapping")
    if "chosen" in data and not isinstance(data["chosen"], dict):
        raise bad("chosen", "a mapping (a table row)")
    if data["version"] == 1 and "chosen" not in data and "exit_rate" in data:
        # Version 1 kept the chosen point's statistics at the top, relative to the large model at its retain.
        data["chosen"] = {"retain": data["fingerprint"].get("retain"), "threshold": data["threshold"],
                          **{k: data[k] for k in ROW_KEYS[2:] if k in data}}
    return data


def calibrated_retain(data: dict[str, Any]) -> float | None:
    """The retain a calibration was chosen for: its `retain`, or a version-1 file's fingerprint's."""
    return data.get("retain", data["fingerprint"].get("retain"))


def read_calibration(path: Path) -> dict:
    """An `sgl calibrate` file, or a CalibrationError naming it."""
    if not Path(path).exists():  # anything else that is no regular file, load_yaml names (never waiting on it)
        raise CalibrationError(f"calibration file {path} not found")
    try:
        return load_calibration(path)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None


def preset_calibration_path(preset: Preset) -> Path | None:
    """The path of the preset's `calibration:` file, relative to the preset file so that a preset travels with
    its calibration; None without one."""
    if preset.settings.calibration is None:
        return None
    path = Path(preset.settings.calibration).expanduser()
    if not path.is_absolute() and preset.source:
        path = Path(preset.source).parent / path
    return path


@dataclass(frozen=True)
class CalibratedPoint:
    """The operating point a calibration file chose, and what it predicted there."""

    path: Path
    retain: float | None  # None: a file that names no retain
    prune_layer: int | None
    threshold: float
    predicted: dict | None  # the file's `chosen` row (exit_rate, accuracy, relative_accuracy, relative_compute)
    n_items: int


def _point(cal: dict, path: Path) -> CalibratedPoint:
    prune_layer = cal.get("prune_layer", cal["fingerprint"].get("prune_layer"))  # version 1: in the fingerprint
    return CalibratedPoint(Path(path), calibrated_retain(cal), prune_layer, float(cal["threshold"]),
                           cal.get("chosen"), cal["n_items"])


# -- resolving a file into a preset ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Purpose:
    """How one use of a calibration file resolves it (a row of PURPOSES)."""

    preset_file: bool  # without an explicit file, the preset's own `calibration:` file is used
    # "run": the whole fingerprint must match (the prune layer included; retain for a version-1 file), checked
    # when anything is taken; "point": only what the threshold depends on (not EXIT_FREE), always checked.
    match: str
    takes: tuple[str, ...]  # the settings taken from the file, each unless given explicitly
    check_point: bool = False  # the chosen point is kept to be measured (`sgl eval --calibration`)


PURPOSES: dict[str, Purpose] = {
    # `sgl run`, `Run`, `Engine.from_preset`: run at the file's retain and threshold (a run must match it).
    "run": Purpose(preset_file=True, match="run", takes=("retain", "threshold")),
    # `sgl eval --calibration`: measure the point the file chose, beside the other settings; its threshold is the
    # evaluation's, its retain one of the settings, its prune layer taken unless given.
    "eval": Purpose(preset_file=False, match="point", takes=("prune_layer",), check_point=True),
    # `sgl inspect`: show one item at the file's operating point (any guide).
    "inspect": Purpose(preset_file=True, match="point", takes=("threshold", "retain", "prune_layer")),
    # `sgl calibrate`: a calibration is measured on both models, never through the preset's own file.
    "calibrate": Purpose(preset_file=False, match="none", takes=()),
}


@dataclass(frozen=True)
class Calibrated:
    """A preset with its calibration resolved for one purpose."""

    preset: Preset
    point: CalibratedPoint | None = None  # the file's operating point (None: no file, or none to check)
    threshold: float | None = None  # the file's threshold (also where the preset does not run with it: eval)


def resolve_calibration(preset: Preset, purpose: str, path: str | Path | None = None,
                        notify: Callable[[str], None] | None = None,
                        warn: Callable[[str], None] | None = None) -> Calibrated:
    """`preset` with the calibration file `path` (else, for the purposes that use it, the preset's own
    `calibration:` file) resolved for `purpose` (a key of PURPOSES). `notify` receives what was taken, `warn`
    (default: notify) what was not. Resolving a resolved preset again changes nothing."""
    p = PURPOSES[purpose]
    notify = notify or (lambda _: None)
    warn = warn or notify
    if p.match == "none":
        return Calibrated(dataclasses.replace(preset, settings=dataclasses.replace(preset.settings, calibration=None)))
    if path is None:
        path = preset_calibration_path(preset) if p.preset_file else None
        if path is None:
            return Calibrated(preset)
    path = Path(path)
    cal = read_calibration(path)
    if p.match == "run":
        resolved = _for_run(preset, cal, path, p.takes, notify, warn)
        return Calibrated(resolved if resolved != preset else preset, _point(cal, path), float(cal["threshold"]))
    return _for_point(preset, cal, path, p, notify, warn)


def _for_run(preset: Preset, cal: dict, path: Path, takes, notify, warn) -> Preset:
    file_retain = cal.get("retain")  # None: a version-1 file, valid for the retain of its fingerprint
    take_threshold = "threshold" in takes and "threshold" not in preset.overridden
    take_retain = "retain" in takes and file_retain is not None and "retain" not in preset.overridden
    if take_threshold or take_retain:  # something is taken from the file: it must be made for this run
        current = fingerprint(preset)
        if "retain" not in cal["fingerprint"]:  # version 2: the file covers several retain values
            del current["retain"]
        differences = fingerprint_differences(cal["fingerprint"], current)
        if differences:
            raise CalibrationError(f"calibration {path} was made for other settings: {'; '.join(differences)}; "
                                   "run `sgl calibrate` with this run's settings, or run with the calibrated ones")
    if not take_threshold:
        t = preset.settings.threshold
        flag = "--no-exit" if t is None else f"--threshold {t:g}"
        warn(f"{flag} overrides the threshold {cal['threshold']:.6g} of the calibration {path}")
    if file_retain is not None and not take_retain and preset.settings.retain != file_retain:
        warn(_retain_override(cal, path, preset.settings.retain))
    if not (take_threshold or take_retain):
        return preset.with_settings(calibration=str(path))
    taken = {"retain": file_retain} if take_retain else {}
    if take_threshold:
        taken["threshold"] = cal["threshold"]
    what = " and ".join(f"{k} {v:.6g}" for k, v in taken.items())
    target = ", ".join(f"{k} {v}" for k, v in cal["target"].items())
    notify(f"{what} from the calibration {path} ({target}, {cal['n_items']} items)")
    calibrated = preset.with_settings(**taken, calibration=str(path))
    return dataclasses.replace(calibrated, overridden=preset.overridden)


def _retain_override(cal: dict, path: Path, retain: float) -> str:
    """`--retain R overrides ...`, and what the file measured at R with its threshold, if anything."""
    head = f"--retain {retain:g} overrides the retain {cal['retain']:g} of the calibration {path}"
    rows = [r for r in cal.get("table") or [] if isinstance(r, dict) and r.get("retain") == retain
            and r.get("threshold") == cal["threshold"]]
    if rows:
        r = rows[0]
        return (f"{head}; with its threshold it measured at retain {retain:g}: exit rate {r['exit_rate']:.1%}, "
                f"{r['relative_accuracy']:.3f} x large accuracy, relative compute {r['relative_compute']:.2f}")
    covered = ", ".join(f"{r:g}" for r in cal.get("retains") or [cal["retain"]])
    return f"{head}, which measured no accuracy at retain {retain:g} (it covers {covered})"


def _check_point(preset: Preset, cal: dict, path: Path) -> None:
    def fixed(fp: dict) -> dict:
        return {k: v for k, v in fp.items() if k not in EXIT_FREE}

    differences = fingerprint_differences(fixed(cal["fingerprint"]), fixed(fingerprint(preset)))
    if differences:
        raise CalibrationError(f"calibration {path} was made for other models or settings: {'; '.join(differences)}")


def _for_point(preset: Preset, cal: dict, path: Path, p: Purpose, notify, warn) -> Calibrated:
    """The file's operating point, for the purposes that vary retain, prune layer and guide around it."""
    _check_point(preset, cal, path)
    point = _point(cal, path)
    notify(f"threshold {point.threshold:.6g} from the calibration {path}")
    if p.check_point and point.retain is None:
        warn(f"{path} names no retain: only its threshold is used")
        return Calibrated(preset, None, point.threshold)
    taken = {k: getattr(point, k) for k in p.takes}
    given = {k: v for k, v in taken.items() if v is not None and k in preset.overridden
             and v != getattr(preset.settings, k)}
    taken = {k: v for k, v in taken.items() if v is not None and k not in preset.overridden}
    if p.check_point:
        taken = {k: v for k, v in taken.items() if v != getattr(preset.settings, k)}
        if "prune_layer" in given:
            warn(f"warning: the calibration chose prune layer {point.prune_layer}; --prune-layer "
                 f"{preset.settings.prune_layer} checks another operating point")
        return Calibrated(preset.with_settings(**taken), point, point.threshold)
    shown = {k: v for k, v in taken.items() if k != "threshold"}
    if shown:
        notify(" and ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in shown.items())
               + f" from the calibration {path}")
    return Calibrated(preset.with_settings(**taken), point, point.threshold)


def apply_calibration(preset: Preset, path: Path | None = None, notify: Callable[[str], None] | None = None,
                      warn: Callable[[str], None] | None = None) -> Preset:
    """The preset running with the retain and threshold of calibration `path` (else of its own `calibration:`
    file): `resolve_calibration(preset, "run", ...)`'s preset."""
    return resolve_calibration(preset, "run", path, notify, warn).preset


def calibration_point(preset: Preset, path: Path, notify: Callable[[str], None] | None = None) -> CalibratedPoint:
    """The operating point of a calibration file made for this pair and exit settings. Retain, prune layer and
    guide may differ (for `sgl eval` and `sgl inspect`, which vary them)."""
    cal = read_calibration(path)
    _check_point(preset, cal, Path(path))
    point = _point(cal, Path(path))
    if notify is not None:
        notify(f"threshold {point.threshold:.6g} from the calibration {path}")
    return point


def calibration_threshold(preset: Preset, path: Path, notify: Callable[[str], None] | None = None) -> float:
    """The threshold of a calibration file made for this pair and exit settings (see `calibration_point`)."""
    return calibration_point(preset, path, notify).threshold
