"""The large model in vLLM's offline `LLM`, through sgl's model plugin (models.py): answers from the visual tokens
sgl kept, numbered as the transformers path numbers them.

    large = VllmLarge("path/to/Qwen2-VL-72B", tensor_parallel_size=4)
    prompt = large.prompt(images, "What is in the image?")   # the checkpoint's chat template, as sgl encodes it
    answers = large.generate([LargeRequest(images, prompt, kept=[0, 5, 9], max_new_tokens=32)])

vLLM is imported here only, when a `VllmLarge` is made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...errors import ItemError, ModelLoadError, SglError
from . import compat
from .plugin import ARCHITECTURES

# model_type -> sgl's architecture for it (plugin.py registers these with vLLM).
FAMILIES = {model_type: arch for arch, model_type in ARCHITECTURES.items()}
FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


class VllmUnavailable(ModelLoadError):
    """vLLM is not installed (or cannot be imported) where the vLLM backend was asked for."""


class UnsupportedFamily(ModelLoadError):
    """A checkpoint whose family sgl's vLLM plugin does not take."""


@dataclass(frozen=True)
class Offers:
    """What the vLLM backend can do for a guide (the seam compares these with what a guide needs)."""

    prune_before_lm: bool = True  # kept visual tokens chosen before the language model (K = 0)
    vision_attention: bool = False  # the large vision tower's attention (the cls guide): not captured
    lm_attention: bool = False  # the large LM's attention at layer K-1 (fastv): not captured
    prune_inside_lm: bool = False  # dropping tokens at a decoder layer K > 0: stock vLLM cannot
    reduced_input: bool = True  # the downsample guide's resized images (resized before the request)


@dataclass(frozen=True)
class LargeRequest:
    """One item for the large model: its images (PIL, in prompt order), the prompt text through the checkpoint's
    chat template with one image part per image (`VllmLarge.prompt`), the kept visual-token indices (0-based over
    the item's visual tokens in sequence order, all images concatenated; None keeps every token), the answer's
    length cap, and greedy decoding (the only mode sgl uses)."""

    images: Sequence[Any]
    prompt: str
    kept: Sequence[int] | None = None
    max_new_tokens: int = 32
    greedy: bool = True
    logprobs: int = 0  # > 0: each step's top-`logprobs` log-probabilities come back in the reply
    # A video (`io.video.Video`: sampled frames and their timing) and its kept tokens (0-based over its own tokens;
    # None keeps every one). With a video, `kept` covers the images' tokens alone.
    video: Any = None
    kept_video: Sequence[int] | None = None


@dataclass(frozen=True)
class LargeReply:
    """The answer to one request: generated token ids (the final EOS included when one was produced, as sgl's
    transformers path records them), the text (special tokens skipped, stripped) and vLLM's finish reason
    ("stop": an EOS or stop token; "length": max_new_tokens reached)."""

    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int = 0  # the prompt's length as vLLM ran it (kept placeholders only)
    logprobs: list[dict[int, float]] | None = None  # per step, token id -> log-probability (when asked for)


@dataclass(frozen=True)
class Rendered:
    """A request as vLLM runs it (`VllmLarge.render`)."""

    prompt_token_ids: list[int]
    positions: Any  # (3, len(prompt_token_ids)) torch.long: M-RoPE ids
    mm_hashes: list[str]  # per image


@dataclass
class VllmSettings:
    """vLLM's engine options sgl exposes (validated by `VllmLarge`)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    dtype: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    extra: dict = field(default_factory=dict)  # more vLLM `LLM` keyword arguments, passed as they are


def read_model_type(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} has no config.json; the vLLM backend takes a local checkpoint folder")
    try:
        return str(json.loads(config.read_text()).get("model_type", ""))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config}: cannot read it as JSON ({exc})") from None


def check_family(model_type: str, where: str) -> str:
    """sgl's vLLM architecture for `model_type`, or UnsupportedFamily in one line naming those that work."""
    if model_type not in FAMILIES:
        works = ", ".join(FAMILY_NAMES[t] for t in FAMILIES)
        raise UnsupportedFamily(f"{where}: the vLLM backend runs {works} models, not {model_type or 'this model'} "
                                "(use the transformers backend)")
    return FAMILIES[model_type]


def import_vllm():
    """The vllm module, or VllmUnavailable in one line saying how to install it (IncompatibleVllm: an untested
    release, or one that moved an internal the plugin uses)."""
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - absent, or present but broken (a torch it was not built for)
        reason = "is not installed" if isinstance(exc, ModuleNotFoundError) and exc.name == "vllm" \
            else f"cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        raise VllmUnavailable(f"the vLLM backend needs vLLM, which {reason}: pip install 'sgl-cli[vllm]' on a GPU "
                              "machine, or scripts/vllm_env.sh DIR on a CPU") from None
    compat.check_vllm()  # a tested release with every internal the plugin uses, or one line naming what moved
    return vllm


class VllmLarge:
    """The large model in vLLM. `model`: a checkpoint folder, `builtin:<pair>/large`, or a preset's ModelSpec
    (its `model` and `dtype` are used). One engine per instance; `close()` frees it."""

    offers = Offers()

    def __init__(self, model: Any, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, max_num_seqs: int | None = None, dtype: str | None = None,
                 seed: int = 0, enforce_eager: bool = False, **extra: Any) -> None:
        from ...builtin.locate import resolve_path

        name = getattr(model, "model", model)
        dtype = dtype or getattr(model, "dtype", None) or "auto"
        self.settings = VllmSettings(tensor_parallel_size, gpu_memory_utilization, max_model_len, max_num_seqs,
                                     dtype, seed, enforce_eager, dict(extra))
        _validate(self.settings)
        self.path = Path(resolve_path(str(name)))
        self.model_type = read_model_type(self.path)
        self.architecture = check_family(self.model_type, str(name))
        self.family = FAMILY_NAMES[self.model_type]
        vllm = import_vllm()
        _check_extra(vllm, self.settings.extra)
        s = self.settings
        kwargs = dict(
            model=str(self.path),
            hf_overrides={"architectures": [self.architecture]},
            tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization,
            dtype=s.dtype,
            seed=s.seed,
            enforce_eager=s.enforce_eager,
            # One video per item, as sgl items have (Qwen3-VL's the plugin refuses).
            limit_mm_per_prompt={"image": 64, "video": 1},
            # The processor cache re-runs the processor on the missing images of a partial hit, alone, which would
            # split the item's kept list against the wrong images (models.py). Hashes, and so the encoder and
            # prefix caches, include the kept set.
            mm_processor_cache_gb=0,
            # Chunked prefill stays on (vLLM warns that turning it off is unsupported). vLLM #48833 (a chunk
            # boundary at an image start) is in EVS's chunk-by-chunk position rewrite, which the plugin does not
            # use: its positions are fixed for the whole prompt when the request is added
            # (tests_vllm/test_chunked_prefill.py puts a boundary there and at every image token).
        )
        if s.max_model_len is not None:
            kwargs["max_model_len"] = s.max_model_len
        if s.max_num_seqs is not None:
            kwargs["max_num_seqs"] = s.max_num_seqs
        kwargs.update(s.extra)
        from .processes import StartFailures, start_failure_reason

        with StartFailures() as failures:
            try:
                self.llm = vllm.LLM(**kwargs)
            except Exception as exc:  # noqa: BLE001 - one line naming the model and vLLM's reason; the cause chained
                reason = start_failure_reason(exc, failures.received())
                raise ModelLoadError(f"vLLM cannot load the large model {name!r}: {reason}") from exc
        self.tokenizer = self.llm.get_tokenizer()
        self._image_processor = None
        self._template_processor = None

    # -- prompts ---------------------------------------------------------------------------------------------
    def prompt(self, images: Sequence[Any], prompt: str | list[dict]) -> str:
        """The prompt text for `images` and a question (or chat turns with {"type": "image"} parts) through the
        checkpoint's chat template, as sgl's families encode it for the transformers path."""
        from ...core.processors import load_processor

        if self._template_processor is None:
            self._template_processor = load_processor(self.path)
        images = list(images)
        messages = prompt if isinstance(prompt, list) else [
            {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]}]
        return self._template_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def visual_tokens(self, images: Sequence[Any]) -> list[int]:
        """How many visual tokens each image becomes (the image processor's resize, merged 2x2 patches)."""
        if self._image_processor is None:
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(str(self.path))
        proc = self._image_processor
        merge = int(proc.merge_size) ** 2
        return [int(proc.get_number_of_image_patches(im.height, im.width, {})) // merge for im in images]

    def render(self, request: LargeRequest) -> "Rendered":
        """What vLLM runs for `request`, computed here by vLLM's own multimodal processor (sgl's subclass) and the
        plugin's position code: the prompt's token ids, its M-RoPE position ids and each image's multimodal hash
        (the key of vLLM's encoder and prefix caches)."""
        from types import SimpleNamespace

        from vllm.multimodal import MULTIMODAL_REGISTRY

        from .models import KEPT, mrope_positions

        config = self.llm.llm_engine.model_config
        processor = MULTIMODAL_REGISTRY.create_processor(config)
        kwargs = {} if request.kept is None else {KEPT: [int(k) for k in request.kept]}
        out = processor(request.prompt, processor.info.parse_mm_data({"image": list(request.images)}),
                        hf_processor_mm_kwargs=kwargs)
        features = [SimpleNamespace(modality="image", data=item, mm_position=where)
                    for item, where in zip(out["mm_kwargs"]["image"], out["mm_placeholders"]["image"])]
        ids = list(out["prompt_token_ids"])
        positions, _ = mrope_positions(config.hf_config, len(ids), features)
        return Rendered(ids, positions, list(out["mm_hashes"]["image"]))

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[LargeRequest]) -> list[LargeReply]:
        """Greedy answers, one per request, in order. A request the plugin cannot take (kept indices out of
        range, unsorted, or an image left with none) raises ItemError naming it before anything runs."""
        prompts, params = self._inputs(requests)
        if not prompts:
            return []
        return [self._reply(out) for out in self.llm.generate(prompts, params, use_tqdm=False)]

    # -- continuous batching: requests added as they come, answers taken as they finish ----------------------
    def enqueue(self, requests: Sequence[LargeRequest]) -> list[str]:
        """Hand `requests` to vLLM's scheduler without waiting (checked as `generate` checks them); their ids.
        `step` runs the engine; requests added between steps join the running batch."""
        prompts, params = self._inputs(requests)
        # vLLM gives its internal ids ("<id>-<8 random characters>"); its answers and abort_request take the id
        # the request was added with.
        return [rid.rsplit("-", 1)[0] for rid in self.llm.enqueue(prompts, params, use_tqdm=False)] if prompts else []

    def step(self) -> list[tuple[str, LargeReply]]:
        """One step of vLLM's engine (its scheduler's batch: prefills and decodes of every request in flight); the
        requests that finished, by id."""
        return [(out.request_id, self._reply(out)) for out in self.llm.llm_engine.step() if out.finished]

    def unfinished(self) -> int:
        """Requests added and not yet finished."""
        return int(self.llm.llm_engine.get_num_unfinished_requests())

    def abort(self, ids: Sequence[str]) -> None:
        """Drop requests in flight (an interrupted run)."""
        if ids and getattr(self, "llm", None) is not None:
            self.llm.llm_engine.abort_request(list(ids))

    def _inputs(self, requests: Sequence[LargeRequest]) -> tuple[list[dict], list]:
        from vllm import SamplingParams

        prompts, params = [], []
        for i, r in enumerate(requests):
            self.check_request(i, r)
            data: dict = {"image": list(r.images)} if r.images else {}
            kwargs: dict = {}
            if r.kept is not None and r.images:
                kwargs["sgl_kept"] = [int(k) for k in r.kept]
            if r.video is not None:
                data["video"] = [_video_input(r.video)]
                if r.kept_video is not None:
                    kwargs["sgl_kept_video"] = [int(k) for k in r.kept_video]
            p: dict = {"prompt": r.prompt, "multi_modal_data": data}
            if kwargs:
                p["mm_processor_kwargs"] = kwargs
            prompts.append(p)
            params.append(SamplingParams(max_tokens=int(r.max_new_tokens), temperature=0.0, seed=self.settings.seed,
                                         skip_special_tokens=True, logprobs=int(r.logprobs) or None))
        return prompts, params

    def _reply(self, out) -> LargeReply:
        gen = out.outputs[0]
        tokens = [int(t) for t in gen.token_ids]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        logprobs = None if gen.logprobs is None else [{int(t): float(lp.logprob) for t, lp in step.items()}
                                                      for step in gen.logprobs]
        return LargeReply(tokens, text, str(gen.finish_reason), len(out.prompt_token_ids or []), logprobs)

    def check_request(self, i: int | None, r: LargeRequest) -> None:
        """Refuse (ItemError naming request `i`, when given) a request the plugin cannot take."""
        from .positions import split_kept

        where = "" if i is None else f"large request {i + 1}: "
        if not r.greedy:
            raise ItemError(f"{where}the vLLM backend decodes greedily only")
        if int(r.max_new_tokens) < 1:
            raise ItemError(f"{where}max_new_tokens must be at least 1, not {r.max_new_tokens}")
        if not r.images and r.video is None:
            raise ItemError(f"{where}no images")
        if r.kept is not None and r.images:
            try:
                split_kept(list(r.kept), self.visual_tokens(r.images))
            except ValueError as exc:
                raise ItemError(f"{where}{exc}") from None

    def close(self) -> None:
        """Stop vLLM's engine processes and free its memory."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del llm

    def __enter__(self) -> "VllmLarge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _video_input(video) -> tuple:
    """A sampled video as vLLM takes it: the frames (T, H, W, 3) uint8 and their timing, with the processor's own
    sampling off (the frames are what sgl sampled; Qwen2.5-VL's temporal ids follow their rate)."""
    import numpy as np

    frames = np.stack([np.asarray(f.convert("RGB")) for f in video.frames])
    return frames, {**video.metadata, "video_backend": "sgl", "do_sample_frames": False}


# What sgl gives vLLM itself (VllmLarge): an extra keyword may not replace it (the plugin's architecture, the
# processor cache that must stay off).
OWN_KWARGS = ("model", "hf_overrides", "limit_mm_per_prompt", "mm_processor_cache_gb")


def _check_extra(vllm, extra: dict) -> None:
    """Refuse an extra keyword that vLLM's `LLM` would not take (its own parameters and `EngineArgs`' fields), or
    that would replace one sgl sets: one line naming it, before the engine starts."""
    import dataclasses
    import difflib
    import inspect

    known = {name for name in inspect.signature(vllm.LLM.__init__).parameters if name not in ("self", "kwargs")}
    known |= {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    for key in extra:
        if key in OWN_KWARGS:
            raise SglError(f"vLLM option {key!r}: sgl sets it itself (the large model, its plugin architecture, images "
                           "only, no processor cache)")
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise SglError(f"vLLM option {key!r}: not an argument of vLLM {vllm.__version__}'s LLM or EngineArgs"
                           + (f" (did you mean {close[0]!r}?)" if close else ""))


def _validate(s: VllmSettings) -> None:
    def bad(name: str, value: Any, why: str) -> SglError:
        return SglError(f"vLLM option {name}: {value!r} {why}")

    if not isinstance(s.tensor_parallel_size, int) or s.tensor_parallel_size < 1:
        raise bad("tensor_parallel_size", s.tensor_parallel_size, "must be a whole number >= 1")
    if not isinstance(s.gpu_memory_utilization, (int, float)) or not 0 < s.gpu_memory_utilization <= 1:
        raise bad("gpu_memory_utilization", s.gpu_memory_utilization, "must be a fraction in (0, 1]")
    for name in ("max_model_len", "max_num_seqs"):
        value = getattr(s, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise bad(name, value, "must be a whole number >= 1")
    if s.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise bad("dtype", s.dtype, "must be one of auto, float32, float16, bfloat16")


__all__ = ["FAMILIES", "LargeReply", "LargeRequest", "Offers", "Rendered", "UnsupportedFamily", "VllmLarge",
           "VllmSettings", "VllmUnavailable", "check_family", "import_vllm"]
