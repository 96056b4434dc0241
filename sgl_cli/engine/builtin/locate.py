"""Where a model name points: `builtin:<pair>/<role>` to the built pair's folder, a local path to itself (checked),
anything else to `from_pretrained` as a hub id. Below every loader (transformers and vLLM backends alike)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError


def resolve_path(model: str) -> str:
    """`builtin:<pair>/<role>` -> the built (cached) folder; anything else is passed to from_pretrained."""
    if model.startswith("builtin:"):
        from .pair import ensure_pair, pair_names

        pair, _, role = model.removeprefix("builtin:").partition("/")
        if pair not in pair_names() or role not in ("small", "large"):
            raise ModelLoadError(
                f"unknown built-in model {model!r}; use builtin:<pair>/<small|large> with pair one of "
                f"{', '.join(pair_names())}"
            )
        try:
            return str(ensure_pair(pair)[role])
        except FileNotFoundError as exc:
            raise ModelLoadError(str(exc)) from None
    if looks_like_path(model) and not Path(model).expanduser().exists():
        raise ModelLoadError(f"model folder {model} does not exist (a hub id looks like org/name)")
    if Path(model).expanduser().exists() and not Path(model).expanduser().is_dir():
        raise ModelLoadError(f"model {model} is a file; give the checkpoint's folder")
    return str(Path(model).expanduser()) if looks_like_path(model) else model


def looks_like_path(model: str) -> bool:
    """A local folder rather than a hub id (`org/name`): absolute, relative with ./ or ../, ~, or deeper than
    org/name."""
    return model.startswith(("/", "./", "../", "~", ".\\")) or model in (".", "..") or model.count("/") > 1 \
        or "\\" in model
