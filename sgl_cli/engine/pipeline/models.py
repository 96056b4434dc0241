"""Loading one model of a pair: the transformers backend's loaders (`backends/transformers.py`), named here too.

Looked up there at each use (not bound at import), so that whatever that module holds is what is called here."""

from __future__ import annotations

from ..backends import transformers as loaders
from ..backends.transformers import LoadedModel  # noqa: F401 - the type, for annotations

_NAMES = ("BNB_BLOCK", "NOT_QUANTIZED", "device_map_for", "finish", "from_arch", "from_memory", "load_model",
          "looks_like_path", "quantization_config", "quantize_in_memory", "resolve_path")


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
