"""The transformers backend, both roles: a transformers `from_pretrained` model in this process (sgl's own forward,
`core/generate.py`'s greedy loop, hooks for every guide). `TransformersSmall` is the small model (its answer with
SGP's importance captured, SEE's re-read), `TransformersLarge` the large one (every capability); `load_model`
loads either (safetensors only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ModelLoadError
from ..families import family_for
from ..preset import ModelSpec
from ..core import hf
from ..core.generate import Row, answer_probs, collate, greedy, rows_device
from ..core.prune import PruneAtLayer
from ..builtin.locate import looks_like_path, resolve_path  # noqa: F401 - public here too
from .base import (CAPABILITIES, LargeBackend, LargeInputs, ModelFacts, Reduced, SmallAnswer, SmallModel,
                   refuse_reduced_video)


@dataclass
class LoadedModel(ModelFacts):
    role: str  # "small" or "large"
    spec: ModelSpec
    path: str
    model: Any
    processor: Any
    family: Any
    eos_ids: frozenset[int]
    pad_id: int
    random_weights: bool = False
    # image_token_id, num_layers, context: ModelFacts' (backends/base.py), as every large backend's.


def engine_options(loaded: LoadedModel) -> dict:
    """How a model runs on transformers, as `sgl bench` reports it: the weights' dtype, the attention
    implementations (language model, vision tower), where it is placed, its quantization, torch's CPU threads."""
    import torch
    import transformers

    m = loaded.model
    config = m.config
    vision = getattr(config, "vision_config", None)
    placed = getattr(m, "hf_device_map", None)
    return {"engine": "transformers", "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "dtype": str(next(m.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": hf.attn_implementation(config.get_text_config()),
            "vision_attn_implementation": hf.attn_implementation(vision) if vision is not None else None,
            "device": str(m.device),
            "device_map": {k: str(v) for k, v in placed.items()} if placed and len(set(placed.values())) > 1 else None,
            "quantize": loaded.spec.quantize, "threads": torch.get_num_threads()}


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
                f"{module.in_features}, not a multiple of {BNB_BLOCK} (bitsandbytes' block); use a GPU or "
                "quantize: none"
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
              dtype: str = "bfloat16", device: str = "cpu", quantize: str | None = None, seed: int = 0,
              large: bool = True):
    """(small, large) `LoadedModel`s of `pair` (a `builtin/arch.py` ArchPair) with random weights, sharing one
    processor; `quantize` ("nf4") applies to the large model, as in `sgl run --quantize`. `large=False`: the small
    model only, (small, None) (`sgl bench` with the large model on another backend)."""
    from ..builtin.arch import build_model, build_processor

    processor = build_processor(pair.small, max(pair.small.text.vocab, pair.large.text.vocab))
    loaded = []
    for i, (role, arch) in enumerate((("small", pair.small), ("large", pair.large))[:2 if large else 1]):
        model = build_model(arch, processor, layers=layers, vision_layers=vision_layers, dtype=dtype, device=device,
                            seed=seed + i)
        spec = ModelSpec(f"arch:{pair.name}/{role}", dtype=dtype, device=device,
                         quantize=quantize if role == "large" else None)
        loaded.append(from_memory(model, processor, spec, role, random_weights=True))
    return tuple(loaded) if large else (loaded[0], None)


class _Loaded:
    """A `LoadedModel` behind a model seam: what the seam declares, read from it."""

    options: ClassVar[dict] = {}  # none: a preset's model spec says it all

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    model = property(lambda self: self.loaded.model)
    processor = property(lambda self: self.loaded.processor)
    family = property(lambda self: self.loaded.family)
    spec = property(lambda self: self.loaded.spec)
    path = property(lambda self: self.loaded.path)
    role = property(lambda self: self.loaded.role)
    eos_ids = property(lambda self: self.loaded.eos_ids)
    pad_id = property(lambda self: self.loaded.pad_id)
    random_weights = property(lambda self: self.loaded.random_weights)

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def on_cpu(self) -> bool:
        return self.model.device.type == "cpu"

    def engine_options(self) -> dict:
        return engine_options(self.loaded)


class TransformersSmall(_Loaded, SmallModel):
    """The small model on transformers: sgl's greedy loop with SGP's importance captured inside its attention
    (`core.capture.ImportanceCapture`, scoped to this pass), and one teacher-forced re-read."""

    name = "transformers"
    takes_video = True

    @classmethod
    def load(cls, spec: ModelSpec, role: str = "small", options: dict | None = None) -> "TransformersSmall":
        return cls(load_model(spec, role))

    def answer(self, works: list, limits: list[int], capture: bool = True) -> list[SmallAnswer]:
        import torch

        from ..core.capture import ImportanceCapture

        m = self.loaded
        rows = m.family.rows(m.model, [w.encoded.small for w in works])
        batch = collate(rows, m.pad_id, rows_device(m.model))
        if not capture:
            gen = greedy(m.model, batch, limits, m.eos_ids, m.pad_id)
            return [SmallAnswer(t, p, None, row) for t, p, row in zip(gen.tokens, gen.probs, rows)]
        width = batch.input_ids.shape[1]
        # SGP's prompt rows: every position after the row's last visual token (left padding shifts rows).
        prompt_rows = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        starts = []
        for i, w in enumerate(works):
            visual = w.encoded.visual
            starts.append(width - len(visual) + int(visual.nonzero().max()) + 1)  # `visual` is on the host
            prompt_rows[i, starts[-1]:] = True
        span = (min(starts), width)

        with ImportanceCapture(m.model, n_keys=width) as cap:
            def observe(step: int, active: torch.Tensor, key_valid: torch.Tensor) -> None:
                # greedy observes a decode step only while some row is active: its one query row is marked
                cap.set_rows(prompt_rows if step == 0 else active[:, None], key_valid, span if step == 0 else (0, 1))

            gen = greedy(m.model, batch, limits, m.eos_ids, m.pad_id, observe=observe)
        scores = cap.scores.float().cpu()
        return [SmallAnswer(gen.tokens[i], gen.probs[i], scores[i, width - len(w.encoded.visual):][w.encoded.visual],
                            row) for i, (w, row) in enumerate(zip(works, rows))]

    def reread(self, works: list, kept: list) -> list[list[float]]:
        m = self.loaded
        rows = [w.small.state.keep(w.encoded.visual, idx) for w, idx in zip(works, kept)]
        return answer_probs(m.model, rows, [w.small.tokens for w in works], m.pad_id)


class TransformersLarge(_Loaded, LargeBackend):
    """The large model on transformers: every capability (the vision tower runs here, so its features and its
    attention are there to read; the language model is sgl's, so tokens can be dropped and read at any layer)."""

    name = "transformers"
    takes_video = True
    offers = CAPABILITIES
    in_process = True
    quantizes = True

    @classmethod
    def load(cls, spec: ModelSpec, role: str = "large", options: dict | None = None) -> "TransformersLarge":
        return cls(load_model(spec, role))

    def inputs(self, works: list, guides: list) -> LargeInputs:
        """One vision-tower call for the batch, under each guide's `watch_vision`; every pre-LM guide's scores."""
        import contextlib

        from ..guides.base import GuideBatch, Kind

        with contextlib.ExitStack() as stack:
            watched = {g.name: stack.enter_context(g.watch_vision(self)) for g in guides}
            rows = self.family.rows(self.model, [w.encoded.large for w in works])
        items = []
        for w, row in zip(works, rows):
            visual = w.encoded.visual
            slots = visual if row.slots is None else row.slots
            items.append(self.guide_item(w, row.feats[visual[slots]]))
        scores = {g.name: g.scores(GuideBatch(self, items, vision=watched[g.name]))
                  for g in guides if g.kind is Kind.RANKS}
        return LargeInputs(list(works), rows, items, scores)

    def generate(self, works: list, inputs: LargeInputs, kept: list, k: int, limits: list[int]):
        """Greedy answers from the `kept` visual tokens of each row, dropping the others at layer k."""
        import torch

        rows = inputs.rows
        device = rows_device(self.model)
        if k == 0:  # dropped tokens never enter the language model
            batch = collate([row.keep(w.encoded.visual, idx) for w, row, idx in zip(works, rows, kept)],
                            self.pad_id, device)
            return greedy(self.model, batch, limits, self.eos_ids, self.pad_id)
        # Layers < k see every token; hooks drop the rest at layer k.
        batch = collate(rows, self.pad_id, device)
        keep = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for i, (w, row, idx) in enumerate(zip(works, rows, kept)):
            keep[i, keep.shape[1] - len(row.ids):] = Row.columns(w.encoded.visual, idx)
        with PruneAtLayer(self.model, k, keep.to(device)):
            return greedy(self.model, batch, limits, self.eos_ids, self.pad_id)

    def rank_in_prefill(self, guide, inputs: LargeInputs, retain: float, k: int, limits: list[int]):
        """A guide that ranks from the large model's own layers < k: its scores are read when layer k starts, and
        the unkept tokens dropped there, in the same forward. Returns (generation, scores, kept)."""
        import dataclasses

        import torch

        from ..guides.base import GuideBatch

        device = rows_device(self.model)
        batch = collate(inputs.rows, self.pad_id, device)
        width = batch.input_ids.shape[1]
        items = [dataclasses.replace(item, offset=width - len(row.ids)) for item, row in zip(inputs.items, inputs.rows)]
        ranked: dict[str, list] = {}

        def select() -> torch.Tensor:  # called by PruneAtLayer when layer k's prefill starts
            scores = guide.scores(GuideBatch(self, items, prefill=watch))
            kept = [guide.keep(self, item, s, retain) for item, s in zip(items, scores)]
            ranked.update(scores=scores, kept=kept)
            keep = torch.zeros((len(items), width), dtype=torch.bool)
            for i, (item, idx) in enumerate(zip(items, kept)):
                keep[i, item.offset:] = Row.columns(item.visual, idx)
            return keep.to(device)

        with PruneAtLayer(self.model, k, select=select), guide.watch_prefill(self, k, width) as watch:
            gen = greedy(self.model, batch, limits, self.eos_ids, self.pad_id, observe=getattr(watch, "observe", None))
        if len(ranked.get("kept", ())) != len(items):
            raise RuntimeError(f"the {guide.name} guide selected tokens for {len(ranked.get('kept', ()))} of "
                               f"{len(items)} rows")
        return gen, ranked["scores"], ranked["kept"]

    def reduced(self, works: list, guide, retain: float) -> list[Reduced]:
        """What the large model would see of each item under `guide` (`reduces_input`) at `retain`."""
        return self._reduced_rows(works, guide, retain)[1]

    def generate_reduced(self, works: list, guide, retain: float, limits: list[int]):
        """Greedy answers from the input `guide` reduced, every token of it kept; and what was seen of each item."""
        rows, seen = self._reduced_rows(works, guide, retain)
        gen = greedy(self.model, collate(rows, self.pad_id, rows_device(self.model)), limits, self.eos_ids, self.pad_id)
        return gen, seen

    def _reduced_rows(self, works: list, guide, retain: float) -> tuple[list[Row], list[Reduced]]:
        """Each item's images through `guide.prepare_images` (resized before the vision tower), encoded again when
        they changed; one vision-tower call; then `guide.pool_rows` (features pooled after it, for
        fixed-resolution towers). The rows, and what the model saw of each item."""
        encs, sizes = [], []
        for w in works:
            refuse_reduced_video(w, guide)
            images = guide.prepare_images(self, list(w.encoded.images), retain)
            same = len(images) == len(w.encoded.images) and all(a is b for a, b in zip(images, w.encoded.images))
            encs.append(w.encoded.large if same else self.family.encode(self.processor, images, w.encoded.prompt))
            sizes.append([im.size for im in images])
        rows = guide.pool_rows(self, self.family.rows(self.model, encs), retain)
        seen = []
        for enc, size, row in zip(encs, sizes, rows):
            if row.grid is not None:  # pooled: from the item's own grid
                n = row.grid[0] * row.grid[1]
                seen.append(Reduced(enc, size, n, row.grid, tuple(self.family.token_grid(self.model, enc))))
            else:
                seen.append(Reduced(enc, size, int(self.visual_mask(enc).sum())))
        return rows, seen
