"""Loading processors on machines without torchvision.

Every transformers processor with a video slot (Qwen2/2.5/3-VL, LLaVA-OneVision, InternVL, ...) requires
torchvision to build its video processor, even for image-only use. sgl only feeds images, so when
`AutoProcessor` cannot load, the same processor class is rebuilt as an image-only subclass: same class
name (ProcessorMixin derives the sub-processor list and the saved kwargs from the subclass `__init__`
signature), `video_processor` forced to None.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path

from ..errors import ModelLoadError
from . import hf


def check_torchvision() -> None:
    """Fail early and clearly when a broken torchvision would make transformers' processors fail later."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # a CUDA-only build on a CPU machine raises at import
        raise ModelLoadError(
            "torchvision is installed but cannot be imported "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); transformers then fails "
            "to build any processor. sgl does not need it: `pip uninstall -y torchvision`."
        ) from None


def image_only(cls: type) -> type:
    """A subclass of processor `cls` with the same name whose `__init__` has no `video_processor`."""
    base_params = [
        p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "video_processor") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    names = [p.name for p in base_params]
    # The parameters must really exist in __init__'s code object: from_pretrained filters the saved
    # kwargs by `__init__.__code__.co_varnames`. So build the function from source, not with *args.
    args = ", ".join(f"{n}=None" for n in names)
    forward = ", ".join(f"{n}={n}" for n in names)
    src = (
        f"def __init__(self, {args}, **kwargs):\n"
        f"    _base.__init__(self, {forward}, video_processor=None, **kwargs)\n"
        "    self.video_processor = _stub\n"
    )
    stub = types.SimpleNamespace(num_frames=None, fps=None, merge_size=None, temporal_patch_size=None)
    namespace: dict = {"_base": cls, "_stub": stub}
    exec(compile(src, f"<image-only {cls.__name__}>", "exec"), namespace)
    return type(cls.__name__, (cls,), {"__init__": namespace["__init__"], "__module__": cls.__module__})


def load_processor(path: str | Path, *, revision: str | None = None, trust_remote_code: bool = False):
    """Load a checkpoint's processor, falling back to an image-only variant when torchvision is absent."""
    from transformers import AutoProcessor

    check_torchvision()
    hf.check_transformers()
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    first_error: Exception | None = None
    try:
        proc = AutoProcessor.from_pretrained(str(path), **kwargs)
        if isinstance(proc, hf.processor_mixin()):
            return proc
        # AutoProcessor silently returns a bare tokenizer when it does not know the processor class.
    except Exception as exc:  # noqa: BLE001 - retried below with the image-only variant
        first_error = exc

    cls_name = _processor_class_name(path, revision)
    cls = hf.processor_class(cls_name) if cls_name else None
    if cls is None:
        raise ModelLoadError(
            f"cannot load a processor from {path}: "
            + (f"{type(first_error).__name__}: {first_error}" if first_error
               else "its configs name no processor_class and its model_type maps to none")
        )
    if "video_processor" not in inspect.signature(cls.__init__).parameters:
        raise ModelLoadError(f"cannot load processor {cls_name} from {path}: {first_error}")
    try:
        return image_only(cls).from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load processor {cls_name} from {path}: {type(exc).__name__}: {exc}") from exc


def _processor_class_name(path: str | Path, revision: str | None) -> str | None:
    """The processor class a checkpoint names in its processor or tokenizer config; else the one AutoProcessor
    maps its `config.json` model_type to."""
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        data = _read_json(path, fname, revision)
        if data.get("processor_class"):
            return data["processor_class"]
    model_type = _read_json(path, "config.json", revision).get("model_type")
    return hf.processor_class_for_model_type(model_type) if isinstance(model_type, str) else None


def _read_json(path: str | Path, fname: str, revision: str | None) -> dict:
    """A checkpoint's JSON file as a dict; {} when it has none (or it is not a JSON object)."""
    import json

    try:
        resolved = hf.cached_file(str(path), fname, revision)
    except Exception:  # noqa: BLE001 - a missing file is the common case
        resolved = None
    if not resolved:
        return {}
    try:
        data = json.loads(Path(resolved).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def equivalent(a, b) -> bool:
    """Whether two checkpoints' processors encode every input alike: the same classes, the same image and video
    processor settings, the same tokenizer (class, vocabulary, special tokens) and chat template. A pair of one
    family usually ships the same processor: its items are then encoded once for both models."""
    if a is b:
        return True
    if _kind(a) != _kind(b):
        return False
    for name in ("image_processor", "video_processor"):
        pa, pb = getattr(a, name, None), getattr(b, name, None)
        if (pa is None) != (pb is None) or (pa is not None and (_kind(pa) != _kind(pb)
                                                                or _settings(pa) != _settings(pb))):
            return False
    ta, tb = getattr(a, "tokenizer", None), getattr(b, "tokenizer", None)
    if (ta is None) != (tb is None):
        return False
    if ta is not None and (_kind(ta) != _kind(tb) or ta.get_vocab() != tb.get_vocab()
                           or ta.all_special_tokens != tb.all_special_tokens):
        return False
    return getattr(a, "chat_template", None) == getattr(b, "chat_template", None)


def _settings(part) -> object:
    """A processor part's settings, comparable (the image-only fallback's placeholders have their attributes)."""
    if hasattr(part, "to_dict"):
        return part.to_dict()
    return vars(part) if hasattr(part, "__dict__") else repr(part)


def _kind(obj) -> tuple:
    """An object's class by name along its bases (`image_only` makes a class per load: equal classes by name)."""
    return tuple(f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__)
