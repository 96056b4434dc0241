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

from .errors import ModelLoadError


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


def _image_only(cls: type) -> type:
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
    from transformers.processing_utils import ProcessorMixin

    check_torchvision()
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    first_error: Exception | None = None
    try:
        proc = AutoProcessor.from_pretrained(str(path), **kwargs)
        if isinstance(proc, ProcessorMixin):
            return proc
        # AutoProcessor silently returns a bare tokenizer when it does not know the processor class.
    except Exception as exc:  # noqa: BLE001 - retried below with the image-only variant
        first_error = exc

    from transformers.models.auto.processing_auto import processor_class_from_name

    cls_name = _processor_class_name(path, revision)
    cls = processor_class_from_name(cls_name) if cls_name else None
    if cls is None:
        raise ModelLoadError(
            f"cannot load a processor from {path}: "
            + (f"{type(first_error).__name__}: {first_error}" if first_error else "no processor_class in its config")
        )
    if "video_processor" not in inspect.signature(cls.__init__).parameters:
        raise ModelLoadError(f"cannot load processor {cls_name} from {path}: {first_error}")
    try:
        return _image_only(cls).from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load processor {cls_name} from {path}: {type(exc).__name__}: {exc}") from exc


def _processor_class_name(path: str | Path, revision: str | None) -> str | None:
    """The processor class a checkpoint names, from its processor or tokenizer config."""
    import json

    from transformers.utils import cached_file

    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            resolved = cached_file(str(path), fname, revision=revision, _raise_exceptions_for_missing_entries=False)
        except Exception:  # noqa: BLE001 - a missing file is the common case
            resolved = None
        if resolved:
            data = json.loads(Path(resolved).read_text())
            if data.get("processor_class"):
                return data["processor_class"]
    return None
