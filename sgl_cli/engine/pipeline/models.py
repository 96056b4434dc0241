"""Loading one model of a pair: `from_pretrained` on a folder or hub id, safetensors only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..families import family_for
from ..preset import ModelSpec
from ..core import hf


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
        from ..builtin.pair import ensure_pair, pair_names

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


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_map_for(spec: ModelSpec, role: str, gpus: int | None = None) -> str | dict:
    """Where the model's modules go, as a `from_pretrained` device_map (accelerate places them).

    An explicit `device_map` wins (a strategy such as "auto" spreads over the visible GPUs; without a GPU it is
    the CPU). Else `device`: "auto" is the first GPU, the CPU without one, and, with several GPUs visible, the
    large model is spread over all of them ("auto") while the small one stays on the first.
    """
    gpus = _gpu_count() if gpus is None else gpus
    if spec.device_map is not None:
        if isinstance(spec.device_map, str) and gpus == 0:
            return {"": "cpu"}
        return dict(spec.device_map) if isinstance(spec.device_map, dict) else spec.device_map
    if spec.device != "auto":
        return {"": spec.device}
    if gpus == 0:
        return {"": "cpu"}
    return "auto" if gpus > 1 and role == "large" else {"": "cuda:0"}


# Only the language model is quantized: the vision tower and its projector are ~1% of a large VLM's weights but
# feed every visual token, and the output head is what transformers leaves unquantized by default. Patterns
# are matched from the start of a module name (transformers' `should_convert_module`).
NOT_QUANTIZED = (r".*\.visual", r".*vision_tower", r".*multi_modal_projector", "lm_head")
BNB_BLOCK = 64  # bitsandbytes' 4-bit block: on CPU, quantized layers need input widths that are multiples of it


def quantization_config(spec: ModelSpec):
    """transformers' BitsAndBytesConfig for `spec.quantize` (NF4 with bf16 compute, or LLM.int8), or None."""
    if spec.quantize is None:
        return None
    import logging

    import torch
    from transformers import BitsAndBytesConfig

    # On CPUs with AVX512-BF16, bitsandbytes warns at import that an optional faster kernel package is missing.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # LLM.int8 casts float32 inputs to float16 and warns on every matmul; once in the docs is enough.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    skip = list(NOT_QUANTIZED)
    if spec.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = torch.float16 if spec.dtype == "float16" else torch.bfloat16  # fp16 for GPUs without bf16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              llm_int8_skip_modules=skip)


def _check_quantized_on_cpu(model, spec: ModelSpec, role: str) -> None:
    """bitsandbytes' packed CPU 4-bit kernels (CPUs with AVX512-BF16) fail on the first forward for input widths
    that are not a multiple of 64: say so at load time, naming the layer."""
    if spec.quantize != "nf4":
        return
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(module).__name__ == "Linear4bit" and weight is not None and weight.device.type == "cpu" \
                and getattr(module, "support_avx512bf16_for_cpu", True) and module.in_features % BNB_BLOCK:
            raise ModelLoadError(
                f"the {role} model {spec.model!r} cannot run 4-bit on the CPU: layer {name} has input width "
                f"{module.in_features}, not a multiple of {BNB_BLOCK} (bitsandbytes' block); use a GPU or quantize: none"
            )


def load_model(spec: ModelSpec, role: str) -> LoadedModel:
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from ..builtin.pair import is_random
    from ..core.processors import load_processor

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
            device_map=device_map_for(spec, role),  # accelerate places (and, across devices, moves) everything
            quantization_config=quantization_config(spec),
        )
    except Exception as exc:  # noqa: BLE001 - surfaced as one line naming the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"cannot load the {role} model {spec.model!r}: {type(exc).__name__}: {first}") from exc
    return finish(model.eval(), processor, spec, role, path, is_random(Path(path)))


def from_memory(model, processor, spec: ModelSpec, role: str, *, random_weights: bool = False) -> LoadedModel:
    """A model and processor built in memory (`sgl bench --arch`) through the same post-load steps as
    `load_model`: `spec.quantize` applied to its weights, the probes, the family, EOS and pad."""
    if spec.quantize is not None:
        quantize_in_memory(model, spec)
    return finish(model.eval(), processor, spec, role, spec.model, random_weights)


def finish(model, processor, spec: ModelSpec, role: str, path: str, random_weights: bool) -> LoadedModel:
    """What every loaded model goes through: the 4-bit width check, the family, the probes, EOS and pad."""
    _check_quantized_on_cpu(model, spec, role)
    family = family_for(model)
    # Every transformers internal sgl uses on this model, probed now: a release that moved one fails here in one
    # line, not per item mid-run.
    hf.check_model(model)
    family.check(model)
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.get_text_config().eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    if not eos_ids:
        raise ModelLoadError(f"the {role} model {spec.model!r} names no EOS token in its generation config")
    pad = gen.pad_token_id if gen.pad_token_id is not None else processor.tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else min(eos_ids))
    return LoadedModel(role, spec, path, model, processor, family, eos_ids, pad_id, random_weights)


def quantize_in_memory(model, spec: ModelSpec) -> None:
    """Quantize the weights of a model built in memory as `from_pretrained` would with `quantization_config(spec)`:
    each language-model `nn.Linear` (not NOT_QUANTIZED) becomes a bitsandbytes layer made from its own weights,
    on its own device, one layer at a time (peak memory: the unquantized model)."""
    import re

    import bitsandbytes as bnb
    import torch

    config = quantization_config(spec)
    skip = [re.compile(p) for p in config.llm_int8_skip_modules]
    names = [name for name, module in model.named_modules()
             if type(module) is torch.nn.Linear and not any(p.match(name) for p in skip)]
    for name in names:  # by name, so that each replaced layer's unquantized weight is freed at once
        module = model.get_submodule(name)
        w = module.weight.data
        if spec.quantize == "8bit":
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                      has_fp16_weights=False, threshold=config.llm_int8_threshold, device="meta")
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=config.bnb_4bit_compute_dtype,
                                    compress_statistics=config.bnb_4bit_use_double_quant,
                                    quant_type=config.bnb_4bit_quant_type,
                                    quant_storage=config.bnb_4bit_quant_storage, device="meta")
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=config.bnb_4bit_quant_type,
                                           compress_statistics=config.bnb_4bit_use_double_quant,
                                           quant_storage=config.bnb_4bit_quant_storage, module=new)
        if module.bias is not None:
            new.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        new = new.to(w.device)  # moving bitsandbytes weights to a device is what quantizes them
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        del module, w
    model.config.quantization_config = config


def from_arch(pair, *, layers: int | None = None, vision_layers: int | None = None,
              dtype: str = "bfloat16", device: str = "cpu", quantize: str | None = None, seed: int = 0):
    """(small, large) `LoadedModel`s of `pair` (a `builtin/arch.py` ArchPair) with random weights, sharing one
    processor; `quantize` ("nf4") applies to the large model, as in `sgl run --quantize`."""
    from ..builtin.arch import build_model, build_processor

    processor = build_processor(pair.small, max(pair.small.text.vocab, pair.large.text.vocab))
    loaded = []
    for i, (role, arch) in enumerate((("small", pair.small), ("large", pair.large))):
        model = build_model(arch, processor, layers=layers, vision_layers=vision_layers, dtype=dtype, device=device,
                            seed=seed + i)
        spec = ModelSpec(f"arch:{pair.name}/{role}", dtype=dtype, device=device,
                         quantize=quantize if role == "large" else None)
        loaded.append(from_memory(model, processor, spec, role, random_weights=True))
    return tuple(loaded)
