"""What a calibration is valid for, and applying a calibration file to a run.

A calibration file is valid for the models and every setting that changes answers or exit scores: its
`fingerprint` (`calibration_fingerprint`: the run's `fingerprint` without retain, since a file covers the retain
values of its table; a version-1 file names its one retain there and is valid for that retain only). It gives a
run its `retain` and `threshold`. `apply_calibration` gives them to a preset when the fingerprints match (the
preset's `calibration:` file, relative to the preset file, or one given explicitly); a retain or threshold given
explicitly wins and says so. `Engine.from_preset` and `Run` apply it, so the Python API runs as `sgl run` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import SglError
from ..preset import ModelSpec, Preset
from .calibration import calibrated_retain, load_calibration


class CalibrationError(SglError):
    """A calibration file that cannot be used for this run."""


# What a calibration is valid for: the models and every setting that changes answers or exit scores.
# Not the threshold (the output), batch size (speed only) or dtype/device (the same model, numerically close).
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
    from ..builtin.pair import SHIPPED, SPECS

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


def apply_calibration(preset: Preset, path: Path | None = None, notify: Callable[[str], None] | None = None,
                      warn: Callable[[str], None] | None = None) -> Preset:
    """The preset running with the retain and threshold of calibration `path` (else of its own `calibration:`
    file), once the file's fingerprint matches this run's. A retain or threshold given explicitly
    (`with_settings`) wins, and `warn` says so; `notify` receives what was taken. Applying twice changes
    nothing."""
    notify = notify or (lambda _: None)
    warn = warn or notify
    if preset.calibration_applied or (path is None and preset.settings.calibration is None):
        return preset
    path = Path(path) if path is not None else preset_calibration_path(preset)
    cal = read_calibration(path)
    file_retain = cal.get("retain")  # None: a version-1 file, valid for the retain of its fingerprint
    take_threshold = "threshold" not in preset.overridden
    take_retain = file_retain is not None and "retain" not in preset.overridden
    if take_threshold or take_retain:  # something is taken from the file: it must be made for this run
        differences = _differences(cal, preset)
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
        return _applied(preset.with_settings(calibration=str(path)))
    taken = {"retain": file_retain} if take_retain else {}
    if take_threshold:
        taken["threshold"] = cal["threshold"]
    what = " and ".join(f"{k} {v:.6g}" for k, v in taken.items())
    target = ", ".join(f"{k} {v}" for k, v in cal["target"].items())
    notify(f"{what} from the calibration {path} ({target}, {cal['n_items']} items)")
    calibrated = preset.with_settings(**taken, calibration=str(path))
    return _applied(dataclasses.replace(calibrated, overridden=preset.overridden))


def _differences(cal: dict, preset: Preset) -> list[str]:
    current = fingerprint(preset)
    if "retain" not in cal["fingerprint"]:  # version 2: the file covers several retain values
        del current["retain"]
    return fingerprint_differences(cal["fingerprint"], current)


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


def _applied(preset: Preset) -> Preset:
    return dataclasses.replace(preset, calibration_applied=True)


# Settings a calibration's threshold does not depend on: the exit decision comes from the small model's pass alone.
EXIT_FREE = ("retain", "prune_layer", "guide")


@dataclass(frozen=True)
class CalibratedPoint:
    """The operating point a calibration file chose, and what it predicted there."""

    path: Path
    retain: float | None  # None: a file that names no retain
    prune_layer: int | None
    threshold: float
    predicted: dict | None  # the file's `chosen` row (exit_rate, accuracy, relative_accuracy, relative_compute)
    n_items: int


def calibration_point(preset: Preset, path: Path, notify: Callable[[str], None] | None = None) -> CalibratedPoint:
    """The operating point of a calibration file made for this pair and exit settings. Retain, prune layer and
    guide may differ (for `sgl eval` and `sgl inspect`, which vary them)."""
    cal = read_calibration(path)

    def fixed(fp: dict) -> dict:
        return {k: v for k, v in fp.items() if k not in EXIT_FREE}

    differences = fingerprint_differences(fixed(cal["fingerprint"]), fixed(fingerprint(preset)))
    if differences:
        raise CalibrationError(f"calibration {path} was made for other models or settings: {'; '.join(differences)}")
    if notify is not None:
        notify(f"threshold {cal['threshold']:.6g} from the calibration {path}")
    prune_layer = cal.get("prune_layer", cal["fingerprint"].get("prune_layer"))  # version 1: in the fingerprint
    return CalibratedPoint(Path(path), calibrated_retain(cal), prune_layer, float(cal["threshold"]),
                           cal.get("chosen"), cal["n_items"])


def calibration_threshold(preset: Preset, path: Path, notify: Callable[[str], None] | None = None) -> float:
    """The threshold of a calibration file made for this pair and exit settings (see `calibration_point`)."""
    return calibration_point(preset, path, notify).threshold
