"""Presets: typed, closed YAML files naming a small/large model pair and the run's defaults.

`small` may be left out (or null): such a preset runs only the guides that need no small model (all but sgl).

An unknown key is an error naming the key and the file; values are type-checked. Settings given on the command
line override the preset's; the resolved preset is what a run records beside its output.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import PresetError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PIPELINES = ("auto", "streaming", "serial")
# Settings that change how fast records come, not what they say (a resumed run may change them).
SPEED_ONLY = ("batch_size", "large_batch_size", "pipeline")
# Weight quantization (bitsandbytes): None, "nf4" (4-bit NormalFloat; "4bit" is an alias) or "8bit" (LLM.int8).
QUANTIZE = ("none", "nf4", "4bit", "8bit")
# accelerate's placement strategies for `device_map`; a mapping (module name -> device) places modules by hand.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu|npu|hpu)(:\d+)?)$")


def normalize_quantize(value: str | None) -> str | None:
    """`none`/None -> None, `4bit` -> `nf4`; other values are returned as given (validate() names them)."""
    if value is None:
        return None
    v = str(value).strip().lower()
    return {"none": None, "4bit": "nf4", "int8": "8bit"}.get(v, v)


@dataclass(frozen=True)
class ModelSpec:
    """One model of the pair. `model` is a local folder, a hub id, or `builtin:<pair>/<role>`."""

    model: str
    dtype: str = "auto"
    attn: str = "sdpa"
    device: str = "auto"  # "auto": the first CUDA device when there is one, else CPU
    revision: str | None = None
    trust_remote_code: bool = False
    quantize: str | None = None  # None, "nf4" ("4bit" is normalised to it) or "8bit": bitsandbytes weights
    # None: `device` decides (with several GPUs visible, the large model is spread by "auto"). Else one of
    # DEVICE_MAP_STRATEGIES, or a mapping of module name -> device ("" is the whole model) placed by accelerate.
    device_map: str | dict | None = field(default=None, hash=False)
    # What runs the model: a registered backend's name for its role (sgl_cli.engine.backends), and that backend's
    # engine options (each backend declares the options it takes; `backends.check_preset` validates them). A preset
    # file's `vllm:` is an alias of `options:` (with `backend: vllm`).
    backend: str = "transformers"
    options: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantize", normalize_quantize(self.quantize))

    def validate(self, where: str) -> None:
        if not self.model:
            raise PresetError(f"{where}.model: must name a folder, a hub id or builtin:<pair>/<role>")
        if self.dtype not in DTYPES:
            raise PresetError(f"{where}.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.quantize not in (None, "nf4", "8bit"):
            raise PresetError(f"{where}.quantize: {self.quantize!r} is not one of {', '.join(QUANTIZE)}")
        self._validate_device_map(where)
        if not isinstance(self.backend, str) or not self.backend.strip():
            raise PresetError(f"{where}.backend: must name a backend (transformers, vllm, or a plugin's)")
        if self.options is not None and not isinstance(self.options, dict):
            raise PresetError(f"{where}.options: must be a mapping of the {self.backend} backend's options")

    def _validate_device_map(self, where: str) -> None:
        dm = self.device_map
        if dm is None:
            return
        if self.device != "auto":
            raise PresetError(f"{where}: give device ({self.device!r}) or device_map, not both")
        if isinstance(dm, str):
            if dm not in DEVICE_MAP_STRATEGIES:
                raise PresetError(
                    f"{where}.device_map: {dm!r} is not one of {', '.join(DEVICE_MAP_STRATEGIES)} (for one device, "
                    "use `device: cuda:1`; to place modules by hand, give a mapping of module name -> device)")
            return
        if not dm:
            raise PresetError(f"{where}.device_map: an empty mapping places nothing; name modules (\"\" is the whole "
                              "model) or use auto")
        for name, device in dm.items():
            if not isinstance(name, str):
                raise PresetError(f"{where}.device_map: module names must be strings, got {name!r}")
            ok = (isinstance(device, int) and not isinstance(device, bool) and device >= 0) or (
                isinstance(device, str) and bool(_DEVICE.match(device)))
            if not ok:
                raise PresetError(
                    f"{where}.device_map[{name!r}]: {device!r} is not a device (a GPU index such as 0, cuda:1, cpu, "
                    "mps, xpu:0)")


@dataclass(frozen=True)
class Settings:
    """What a run does with the pair. Every field can be overridden from the command line."""

    retain: float = 0.09
    prune_layer: int = 0
    consistency_retain: float = 0.05
    threshold: float | None = 0.9  # None: never exit early
    max_new_tokens: int = 16
    max_prompt_tokens: int | None = None  # longer prompts are error records (None: the models' context decides)
    prompt_suffix: str = "Answer the question using a single word or phrase."
    batch_size: int = 1  # the small stage's batch (and the large stage's on the serial pipeline)
    # The large stage of the streaming pipeline: its batch (transformers) or the requests it keeps in flight (vLLM's
    # continuous batching). None: the backend's default (transformers: batch_size; vLLM: its max_num_seqs, else 256).
    large_batch_size: int | None = None
    # streaming: the small and the large stage run at once (pipeline/stream.py); serial: each batch through both
    # in turn; auto: serial where both compute on the CPU's cores, else streaming (`Engine.pipeline_mode`). The
    # records are the same; only the speed differs.
    pipeline: str = "auto"
    calibration: str | None = None  # a `sgl calibrate` file whose threshold a run uses (relative: to the preset)
    guide: str = "sgl"  # what ranks the visual tokens: a registered guide (built-in or a plugin's)
    seed: int = 0  # the random guide's seed
    # A video item's frames: sampled at `video_fps` per second, at most `video_max_frames` spread over the whole
    # video (an item's own `fps` and `max_frames` take precedence).
    video_fps: float = 2.0
    video_max_frames: int = 64

    def validate(self, where: str = "settings") -> None:
        if not 0.0 < self.retain <= 1.0:
            raise PresetError(f"{where}: retain must be in (0, 1], got {self.retain}")
        if not 0.0 < self.consistency_retain <= 1.0:
            raise PresetError(f"{where}: consistency_retain must be in (0, 1], got {self.consistency_retain}")
        if not 0 <= self.prune_layer <= 10_000:
            raise PresetError(f"{where}: prune_layer must be >= 0, got {self.prune_layer}")
        if self.threshold is not None and not (0.0 <= self.threshold and math.isfinite(self.threshold)):
            raise PresetError(f"{where}: threshold must be >= 0 (or null to never exit), got {self.threshold}")
        if not 1 <= self.max_new_tokens <= 1_000_000:
            raise PresetError(f"{where}: max_new_tokens must be in 1..1000000, got {self.max_new_tokens}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise PresetError(f"{where}: max_prompt_tokens must be >= 1 (or null), got {self.max_prompt_tokens}")
        if not 1 <= self.batch_size <= 100_000:
            raise PresetError(f"{where}: batch_size must be in 1..100000, got {self.batch_size}")
        if self.large_batch_size is not None and not 1 <= self.large_batch_size <= 100_000:
            raise PresetError(f"{where}: large_batch_size must be in 1..100000 (or null), got {self.large_batch_size}")
        if self.pipeline not in PIPELINES:
            raise PresetError(f"{where}: pipeline must be one of {', '.join(PIPELINES)}, got {_quote(self.pipeline)}")
        from .guides import guide_names

        if self.guide not in guide_names():
            raise PresetError(f"{where}: guide must be one of {', '.join(guide_names())}, got {_quote(self.guide)}")
        if not (0.0 < self.video_fps <= 60.0):
            raise PresetError(f"{where}: video_fps must be in (0, 60], got {self.video_fps}")
        if not 1 <= self.video_max_frames <= 4096:
            raise PresetError(f"{where}: video_max_frames must be in 1..4096, got {self.video_max_frames}")
        if self.calibration is not None and not self.calibration.strip():
            raise PresetError(f"{where}: calibration must name a file (or be null), got {self.calibration!r}")


@dataclass(frozen=True)
class Preset:
    name: str
    small: ModelSpec | None  # None: no small model (only the guides that do not need one can run)
    large: ModelSpec
    settings: Settings = field(default_factory=Settings)
    description: str = ""
    source: str = ""  # the file it was read from; not written back
    # The settings given explicitly over the file's (with_settings; and the large model's `large_quantize`,
    # `large_backend`, `large_options`): a calibration file does not override them, errors name their flags.
    overridden: frozenset[str] = frozenset()

    def with_settings(self, **overrides: Any) -> "Preset":
        """A copy with the non-None overrides applied (`threshold=None` is spelled `no_exit=True`)."""
        changes = {k: v for k, v in overrides.items() if v is not None and k != "no_exit"}
        if overrides.get("no_exit"):
            changes["threshold"] = None
        settings = dataclasses.replace(self.settings, **changes)
        settings.validate("command line")
        return dataclasses.replace(self, settings=settings, overridden=self.overridden | set(changes))

    def with_quantize(self, quantize: str | None) -> "Preset":
        """A copy whose large model is quantized as given (`sgl run --quantize`); None leaves the preset's."""
        if quantize is None:
            return self
        if normalize_quantize(quantize) not in (None, "nf4", "8bit"):
            raise PresetError(f"--quantize: {quantize!r} is not one of {', '.join(QUANTIZE)}")
        large = dataclasses.replace(self.large, quantize=quantize)
        return dataclasses.replace(self, large=large, overridden=self.overridden | {"large_quantize"})

    def with_large_backend(self, backend: str | None, options: dict | None = None) -> "Preset":
        """A copy whose large model runs on `backend` (`--large-backend`; None leaves the preset's), with
        `options` (`--large-option`) over the preset's own for that backend (those of another backend are
        dropped: they were that backend's)."""
        large, given = self.large, set()
        if backend is not None and backend != large.backend:
            large, given = dataclasses.replace(large, backend=backend, options=None), {"large_backend"}
        if options:
            large, given = dataclasses.replace(large, options={**(large.options or {}), **options}), \
                given | {"large_options"}
        return self if large is self.large else dataclasses.replace(self, large=large,
                                                                    overridden=self.overridden | given)

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description}
        d["small"] = dataclasses.asdict(self.small) if self.small is not None else None
        d["large"] = dataclasses.asdict(self.large)
        d.update(dataclasses.asdict(self.settings))
        return d


def _typed(cls, data: Any, where: str, source: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise PresetError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls) if f.name not in _NOT_KEYS}
    for key in data:
        if key not in known:
            keys = TOP_KEYS if cls is _Header else tuple(known)
            raise PresetError(f"{source}: unknown key {where + '.' if where else ''}{_quote(key)}"
                              f"{_nearest(key, keys)}; known keys: {', '.join(keys)}")
    values = {}
    for key, value in data.items():
        expected = known[key].type
        if not _type_ok(expected, value):
            raise PresetError(f"{source}: {where + '.' if where else ''}{key} must be {expected}, got "
                              f"{_quote(value)}")
        values[key] = float(value) if "float" in str(expected) and isinstance(value, int) and not isinstance(
            value, bool) else value
    missing = [f.name for f in known.values() if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PresetError(f"{source}: missing key {(where + '.' if where else '') + missing[0]!r}")
    return cls(**values)


_NOT_KEYS = ("source", "overridden")


def _quote(value: Any, limit: int = 60) -> str:
    """A value in an error message: its repr, cut short (a preset can hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _nearest(key: Any, keys) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), list(keys), n=1) if isinstance(key, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_ok(expected: str, value: Any) -> bool:
    allowed = {"str": str, "float": (int, float), "int": int, "bool": bool, "None": type(None), "dict": dict}
    parts = [p.strip() for p in str(expected).split("|")]
    for p in parts:
        t = allowed.get(p)
        if t is None:
            continue
        if isinstance(value, bool) and p in ("int", "float"):
            continue  # YAML `yes` is not a number
        if isinstance(value, t):
            return True
    return False


SETTINGS_KEYS = tuple(f.name for f in fields(Settings))
TOP_KEYS = ("name", "description", "small", "large", *SETTINGS_KEYS)


def parse_preset(data: Any, source: str) -> Preset:
    if not isinstance(data, dict):
        raise PresetError(f"{source}: a preset must be a YAML mapping")
    data = dict(data)
    if "large" not in data:
        raise PresetError(f"{source}: missing key 'large' (the large model)")
    # `small` is optional: without it only the single-model guides run (the sgl guide says so when it loads).
    small = data.pop("small", None)
    small = None if small is None else _local(_typed(ModelSpec, _alias(small, "small", source), "small", source),
                                              source)
    large = _local(_typed(ModelSpec, _alias(data.pop("large"), "large", source), "large", source), source)
    settings = _typed(Settings, {k: data.pop(k) for k in SETTINGS_KEYS if k in data}, "", source)
    rest = _typed(_Header, data, "", source)
    if small is not None:
        small.validate(f"{source}: small")
    large.validate(f"{source}: large")
    settings.validate(source)
    return Preset(name=rest.name, description=rest.description, small=small, large=large, settings=settings,
                  source=source)


def parse_options(pairs, flag: str) -> dict | None:
    """Backend options given on the command line (`--large-option KEY=VALUE`, repeated), with YAML's scalars: true,
    false, null, numbers, else the text (the backend validates them). None: none given."""
    if not pairs:
        return None
    out: dict = {}
    for pair in pairs:
        key, eq, value = str(pair).partition("=")
        if not eq or not key.strip():
            raise PresetError(f"{flag}: give KEY=VALUE (e.g. max_num_seqs=8), not {_quote(pair)}")
        out[key.strip()] = _scalar(value.strip())
    return out


def _scalar(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _alias(data: Any, where: str, source: str) -> Any:
    """A model's mapping with `vllm:` (sgl 0.2's key for vLLM's options) read as `options:`, with `backend: vllm`."""
    if not isinstance(data, dict) or "vllm" not in data:
        return data
    data = dict(data)
    if data.get("options") is not None and data["vllm"] is not None:
        raise PresetError(f"{source}: {where}: give options or vllm (its alias), not both")
    if data.get("backend", "transformers") != "vllm" and data["vllm"] is not None:
        raise PresetError(f"{source}: {where}.vllm: vLLM options apply with backend: vllm, not "
                          f"{_quote(data.get('backend', 'transformers'))}")
    vllm = data.pop("vllm")
    data["options"] = vllm if vllm is not None else data.get("options")
    return data


def _local(spec: ModelSpec, source: str) -> ModelSpec:
    """A relative folder in a preset file means relative to that file (so a preset travels with its models)."""
    if spec.model.startswith("builtin:") or Path(spec.model).is_absolute() or not source:
        return spec
    candidate = Path(source).parent / spec.model
    return dataclasses.replace(spec, model=str(candidate.resolve())) if candidate.is_dir() else spec


@dataclass(frozen=True)
class _Header:
    name: str
    description: str = ""


def presets_dir() -> Path:
    """The shipped presets: inside the installed package, or the repository's `presets/` in a checkout."""
    packaged = Path(__file__).resolve().parent.parent / "presets"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "presets"


def available_presets() -> dict[str, Path]:
    folder = presets_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def load_preset(name_or_path: str | None = None) -> Preset:
    """Load a preset by shipped name (`default` when None) or from a YAML file path."""
    from .safe_yaml import YamlError, load_yaml

    name_or_path = name_or_path or "default"
    shipped = available_presets()
    path = Path(name_or_path)
    if name_or_path in shipped:
        path = shipped[name_or_path]
    elif not (path.suffix in (".yaml", ".yml") or path.exists()):
        raise PresetError(f"unknown preset {name_or_path!r}; available: {', '.join(shipped) or 'none'}")
    if not path.exists():
        raise PresetError(f"preset file {path} not found")
    try:  # load_yaml says what a path that is no regular file is (a folder, a FIFO, a device), never waiting on it
        data = load_yaml(path)
    except YamlError as exc:
        raise PresetError(str(exc)) from None
    return parse_preset(data, str(path))
