"""The one seam between sgl and transformers' internals.

sgl reaches below transformers' public API in a few places: the attention-function registry (importance capture,
[CLS] scores), decoder-layer keyword arguments (pruning inside the language model), the cache keyword and cache
objects, the encoder-output classes that `mm_encoder_outputs` takes, and a few module-level helpers of the model
families. Every such use goes through this module, so a transformers release that renames one breaks here, in one
place, with one line that says what moved, instead of as a per-item KeyError deep in a run.

`check_transformers()` probes the internals that need no model, then the release (at the first processor load,
before any weights, and in the tests): an untested release is refused even where nothing it moved is probed here.
`check_model(model)` probes one loaded model's (decoder layers, the cache keyword, `mm_encoder_outputs`). The
families probe their own methods (`Family.check`). Each failure names the internal (or the release) and the tested
range.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from typing import Any, Callable

from ..errors import SglError

# The transformers releases the whole suite has passed on: the oldest and the newest sgl admits. pyproject.toml's
# bound is derived from these (a test checks that they agree).
TESTED = ("5.18.0", "5.25.0")


class IncompatibleTransformers(SglError):
    """The installed transformers lacks an internal sgl relies on."""


def tested_range() -> str:
    return f"{TESTED[0].rsplit('.', 1)[0]}-{TESTED[1].rsplit('.', 1)[0]}"


def version() -> str:
    import transformers

    return transformers.__version__


def admitted() -> str:
    """The version specifier pyproject.toml gives transformers: from the oldest tested release to below the minor
    release after the newest."""
    major, minor, *_ = TESTED[1].split(".")
    return f">={TESTED[0]},<{major}.{int(minor) + 1}"


def in_range(v: str) -> bool:
    """Whether transformers `v` is admitted (a dev or local build counts as its release: 5.25.0.dev0 as 5.25.0)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(v).base_version in SpecifierSet(admitted())
    except InvalidVersion:
        return False


def incompatible(what: str) -> IncompatibleTransformers:
    """The error for an internal this transformers lacks: one line naming it and the tested range."""
    return IncompatibleTransformers(f"transformers {version()}: {what}; sgl supports transformers {tested_range()} "
                                    f"(pip install 'transformers{admitted()}')")


def _attr(module: str, name: str) -> Any:
    """`module.name`, or IncompatibleTransformers naming it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise incompatible(f"{module}.{name} is gone") from None


# -- probes ------------------------------------------------------------------------------------------------------
_STATIC = (
    ("transformers", "AttentionInterface"),
    ("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS"),
    ("transformers.masking_utils", "AttentionMaskInterface"),
    ("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS"),
    ("transformers.modeling_outputs", "BaseModelOutputWithPooling"),
    ("transformers.processing_utils", "ProcessorMixin"),
    ("transformers.models.auto.processing_auto", "processor_class_from_name"),
    ("transformers.models.auto.processing_auto", "PROCESSOR_MAPPING_NAMES"),
    ("transformers.utils", "cached_file"),
)


@functools.cache
def check_transformers() -> None:
    """Every model-independent internal sgl uses exists, and this transformers is a release the suite passed on
    (raises IncompatibleTransformers naming the first internal that moved, or the release). Cached: probed once
    per process."""
    for module, name in _STATIC:
        _attr(module, name)
    if "sdpa" not in _attr("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS"):
        raise incompatible("the attention registry has no 'sdpa' function")
    if not in_range(version()):
        raise incompatible("not a release sgl was tested on")


def check_model(model) -> None:
    """The internals sgl uses on one loaded model: decoder layers with `self_attn.layer_idx`, a cache keyword
    they take, rotary embeddings passed to them, and `mm_encoder_outputs` on the model's forward."""
    check_transformers()
    name = type(model).__name__
    try:
        layers = decoder_layers(model)
    except AttributeError:
        raise incompatible(f"{name}.get_decoder().layers is gone") from None
    layer = layers[0]
    if getattr(getattr(layer, "self_attn", None), "layer_idx", None) is None:
        raise incompatible(f"the decoder layers of {name} have no self_attn.layer_idx")
    params = _params(type(layer).forward)
    if _cache_name(params) is None:
        raise incompatible(f"the decoder layers of {name} take neither `cache` nor `past_key_values`")
    if "position_embeddings" not in params:
        raise incompatible(f"the decoder layers of {name} no longer take `position_embeddings`")
    forward = _params(type(model).forward)
    for arg in ("mm_encoder_outputs", "position_ids", "logits_to_keep"):
        if arg not in forward and not _takes_kwargs(type(model).forward):
            raise incompatible(f"{name}.forward no longer takes `{arg}`")
    if _cache_name(forward) is None:
        raise incompatible(f"{name}.forward takes neither `cache` nor `past_key_values`")


def _params(fn: Callable) -> dict:
    return dict(inspect.signature(fn).parameters)  # follows functools.wraps (deprecate_kwarg) to the real one


def _takes_kwargs(fn: Callable) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in _params(fn).values())


def _cache_name(params: dict) -> str | None:
    # transformers 5.24 renamed the cache keyword `past_key_values` -> `cache` (the old name warns until 5.40).
    return next((n for n in ("cache", "past_key_values") if n in params), None)


# -- the cache keyword --------------------------------------------------------------------------------------------
def cache_keyword(fn: Callable) -> str | None:
    """The name under which `fn` (a forward) takes the cache: `cache` since 5.24, `past_key_values` before."""
    return _cache_name(_params(fn))


@functools.cache
def forward_cache_name(cls: type) -> str:
    return cache_keyword(cls.forward) or "past_key_values"


def forward(model, cache=None, **kwargs):
    """`model(**kwargs)` with the cache under the keyword this transformers takes; returns (output, its cache)."""
    out = model(**kwargs, **{forward_cache_name(type(model)): cache})
    return out, output_cache(out)


def output_cache(out) -> Any:
    """The cache a model output carries: its `cache` field since 5.24, `past_key_values` before (reading the
    old name on a new output warns)."""
    names = getattr(type(out), "__dataclass_fields__", {})
    return getattr(out, "cache" if "cache" in names else "past_key_values", None)


def layer_cache(kwargs: dict) -> Any:
    """The cache a decoder-layer hook receives, under whichever keyword this transformers passes."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def decoder_layers(model):
    """The language model's decoder layers."""
    return model.get_decoder().layers


# -- attention functions ------------------------------------------------------------------------------------------
def attention_functions():
    return _attr("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS")


def eager_attention_for(module) -> Callable:
    """The model family's own eager attention function (eager is not in the AttentionInterface registry)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise incompatible(f"{type(module).__module__} has no eager_attention_forward")
    return fn


def register_attention(name: str, fn: Callable, mask_like: str) -> None:
    """Register attention function `name`, taking the mask format of backend `mask_like` (when it has one)."""
    _attr("transformers", "AttentionInterface").register(name, fn)
    masks = _attr("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS")
    if mask_like in masks:
        _attr("transformers.masking_utils", "AttentionMaskInterface").register(name, masks[mask_like])


def attn_implementation(config) -> str | None:
    """The attention backend a (sub-)config dispatches on."""
    return config._attn_implementation


# -- encoder outputs (`mm_encoder_outputs`) ------------------------------------------------------------------------
def pooled_output(pooler_output) -> Any:
    """The encoder output `mm_encoder_outputs["image"]` takes: `pooler_output` holding the image features."""
    return _attr("transformers.modeling_outputs", "BaseModelOutputWithPooling")(pooler_output=pooler_output)


def deepstack_output(feats, deepstack: tuple) -> Any:
    """Qwen3-VL's encoder output: the features and their deepstack levels."""
    cls = _attr("transformers.models.qwen3_vl.modeling_qwen3_vl", "BaseModelOutputWithDeepstackFeatures")
    return cls(pooler_output=(feats,), deepstack_features=[(d,) for d in deepstack])


def video_metadata(**fields) -> Any:
    """transformers' `VideoMetadata` (the sampled frames' count, rate and span, which the video processors read
    instead of sampling themselves)."""
    return _attr("transformers.video_utils", "VideoMetadata")(**fields)


# -- family helpers (module-level functions the families' layouts need) ---------------------------------------------
def vision_window_index(visual, grid):
    """The merged-token order a windowed (Qwen2.5-VL) tower runs in: position j holds raster token index[j]."""
    fn = window_index_function(visual)
    if fn is None:  # older transformers: a method of the tower
        return visual.get_window_index(grid.to(visual.device))[0]
    index, _ = fn(grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                  patch_size=visual.patch_size)
    return index


def window_index_function(visual) -> Callable | None:
    try:  # transformers >= 5: a module-level function
        return importlib.import_module("transformers.vision_utils").get_vision_window_index
    except (ImportError, AttributeError):
        if not hasattr(visual, "get_window_index"):
            raise incompatible("neither transformers.vision_utils.get_vision_window_index nor the Qwen2.5-VL "
                                "tower's get_window_index exists") from None
        return None


def llava_module(model_type: str):
    """`transformers.models.<model_type>.modeling_<model_type>` (LLaVA-NeXT's anyres helpers live there)."""
    try:
        return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        raise incompatible(f"transformers.models.{model_type} is gone") from None


def anyres_helpers(model_type: str) -> tuple[Callable, Callable]:
    """(image_size_to_num_patches, get_anyres_image_grid_shape) of a LLaVA-NeXT-style family."""
    module = llava_module(model_type)
    names = ("image_size_to_num_patches", "get_anyres_image_grid_shape")
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise incompatible(f"{module.__name__}.{missing[0]} is gone")
    return tuple(getattr(module, n) for n in names)


def optimal_tiled_canvas() -> Callable:
    """GOT-OCR2's dynamic tiling choice (InternVL's image processor uses it)."""
    for module in ("transformers.models.got_ocr2.image_processing_pil_got_ocr2",
                   "transformers.models.got_ocr2.image_processing_got_ocr2"):  # older: beside the torch processor
        try:
            return importlib.import_module(module).get_optimal_tiled_canvas
        except (ImportError, AttributeError):
            continue
    raise incompatible("transformers.models.got_ocr2's get_optimal_tiled_canvas is gone")


# -- processors ---------------------------------------------------------------------------------------------------
def processor_mixin() -> type:
    return _attr("transformers.processing_utils", "ProcessorMixin")


def processor_class(name: str) -> type | None:
    return _attr("transformers.models.auto.processing_auto", "processor_class_from_name")(name)


def processor_class_for_model_type(model_type: str) -> str | None:
    """The processor class transformers' AutoProcessor maps `model_type` to (None: it maps none)."""
    return _attr("transformers.models.auto.processing_auto", "PROCESSOR_MAPPING_NAMES").get(model_type)


def cached_file(path: str, filename: str, revision: str | None):
    """A checkpoint file's local path (a local folder, or the hub cache), or None when the checkpoint lacks it."""
    fn = _attr("transformers.utils", "cached_file")
    return fn(path, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
