"""Loading one model of a pair: `from_pretrained` on a folder or hub id, safetensors only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .family import family_for
from .preset import ModelSpec


@dataclass
class LoadedModel:
    role: str  # "small" or "large"
    spec: ModelSpec
    path: str
    model: Any
    processor: Any
    family: Any
    eos_ids: frozenset[int]
    pad_id: int
    random_weights: bool = False

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id(self.model)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)


def resolve_path(model: str) -> str:
    """`builtin:<pair>/<role>` -> the built (cached) folder; anything else is passed to from_pretrained."""
    if model.startswith("builtin:"):
        from .builtin import SPECS, ensure_pair

        pair, _, role = model.removeprefix("builtin:").partition("/")
        if pair not in SPECS or role not in ("small", "large"):
            raise ModelLoadError(
                f"unknown built-in model {model!r}; use builtin:<pair>/<small|large> with pair one of "
                f"{', '.join(SPECS)}"
            )
        return str(ensure_pair(pair)[role])
    return model


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: ModelSpec, role: str) -> LoadedModel:
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from .builtin import is_random
    from .processors import load_processor

    hf_logging.disable_progress_bar()  # data and progress of our own only
    path = resolve_path(spec.model)
    processor = load_processor(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=_dtype(spec.dtype),
            attn_implementation=spec.attn,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=True,
        )
    except Exception as exc:  # noqa: BLE001 - surfaced as one line naming the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"cannot load the {role} model {spec.model!r}: {type(exc).__name__}: {first}") from exc
    model = model.to(_device(spec.device)).eval()
    family = family_for(model)
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.get_text_config().eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    if not eos_ids:
        raise ModelLoadError(f"the {role} model {spec.model!r} names no EOS token in its generation config")
    pad = gen.pad_token_id if gen.pad_token_id is not None else processor.tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else min(eos_ids))
    return LoadedModel(role, spec, path, model, processor, family, eos_ids, pad_id, is_random(Path(path)))
