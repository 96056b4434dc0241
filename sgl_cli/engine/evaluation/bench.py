"""What `sgl bench` measures on: a published architecture with random weights (`arch`), a preset's checkpoints, or
a built-in random pair (`size`); the items (generated images of a chosen size, or a JSONL file); and the run.

    bench = Bench(arch="qwen2.5-vl-3b-7b", layers=2, image_size="224")
    engine, items = bench.load(n_items=8)
    report = bench.run(engine, items, batch_sizes=(1, 8))

The large model can run on several backends side by side (`large_backend="transformers,vllm"`): each is loaded
with the same weights (the built-in pairs are built into a folder both load; a preset's checkpoints; `--arch`
builds its weights in memory for transformers and gives vLLM a folder with the config and processor only, which
vLLM fills with random weights of its own: the timings compare, the answers do not), `engine.large` is the first,
and `run` measures them all in the same rounds.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SglError
from .bench_inputs import (available_ram, parse_backends, parse_image_size, parse_options, parse_sizes,  # noqa: F401
                           realistic_pair, write_noise_items)

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Bench:
    arch: str | None = None
    preset: str | None = None
    size: str = "realistic"
    layers: int | None = None
    vision_layers: int | None = None
    # auto: bfloat16 on a GPU, float32 on a CPU (torch's CPU bfloat16 linear on a (1, 1, d) input copies the whole
    # transposed weight: ~9 s per decode step for a 152k-token output head).
    dtype: str = "auto"
    device: str = "auto"
    quantize: str | None = None
    visual_tokens: int | None = None
    image_size: str | None = None
    retain: float = 0.09
    prune_layer: int = 0
    threshold: float | None = 0.9
    max_new_tokens: int = 8
    # What runs the large model: a backend name or a comma list measured side by side (None: a preset's own, else
    # transformers). `options` (`--large-option`): engine options, each to the backends named that declare it;
    # `backend_options`: backend name -> its own (`--vllm`). Both over the preset's and each backend's
    # `bench_options`.
    large_backend: str | tuple[str, ...] | None = None
    options: dict | None = None
    backend_options: dict[str, dict] = dataclasses.field(default_factory=dict)
    described: dict = dataclasses.field(default_factory=dict)
    larges: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # name -> loaded backend
    same_weights: bool = dataclasses.field(default=True, init=False, repr=False)
    _max_batch: int = dataclasses.field(default=8, init=False, repr=False)
    _n_items: int | None = dataclasses.field(default=None, init=False, repr=False)  # through the pipeline
    _noise: tuple | None = dataclasses.field(default=None, init=False, repr=False)  # (folder, size) load generated
    _folders: list = dataclasses.field(default_factory=list, init=False, repr=False)  # removed with this object

    def __post_init__(self) -> None:
        from ..preset import QUANTIZE, normalize_quantize

        if self.quantize is not None and normalize_quantize(self.quantize) not in (None, "nf4", "8bit"):
            raise SglError(f"--quantize: {self.quantize!r} is not one of {', '.join(QUANTIZE)}")
        if self.quantize is not None and self.arch is None and self.preset is None:
            raise SglError("--quantize applies to --arch or --preset, not to the built-in random pairs")
        if not isinstance(self.large_backend, (str, type(None))):
            self.large_backend = ",".join(self.large_backend)
        names = parse_backends(self.large_backend)
        if names:
            self._check_given(names)

    def _check_given(self, names: tuple[str, ...]) -> None:
        """--quantize, --large-option and --vllm against the backends measured: one line for one they do not fit."""
        from ..backends import backend_class

        classes = {name: backend_class(name) for name in names}
        unquantized = [name for name, cls in classes.items() if not cls.quantizes]
        if self.quantize is not None and unquantized:
            raise SglError(f"--quantize applies to the transformers large backend (bitsandbytes weights), not to "
                           f"{', '.join(unquantized)}")
        for name, options in self.backend_options.items():
            if name not in classes:
                raise SglError(f"--{name}: {name}'s options apply with --large-backend {name}")
            classes[name].check_options(options, f"--{name}")
        for key, value in (self.options or {}).items():
            takers = [name for name, cls in classes.items() if key in cls.options]
            if not takers:
                raise SglError(f"--large-option {key}: none of the large backends measured ({', '.join(names)}) takes "
                               "it")
            for name in takers:
                classes[name].check_options({key: value}, "--large-option")

    def _given(self, name: str) -> dict:
        """The options given on the command line for backend `name`: the --large-option keys it declares, then its
        own (`backend_options`)."""
        from ..backends import backend_class

        declared = backend_class(name).options
        return {**{k: v for k, v in (self.options or {}).items() if k in declared},
                **self.backend_options.get(name, {})}

    def _scratch(self, prefix: str) -> Path:
        """A temporary folder removed with this object (or at exit): generated images and built pairs."""
        folder = tempfile.TemporaryDirectory(prefix=prefix)
        self._folders.append(folder)
        return Path(folder.name)

    def settings(self):
        from ..preset import Settings

        settings = Settings(retain=self.retain, prune_layer=self.prune_layer, threshold=self.threshold,
                            max_new_tokens=self.max_new_tokens, prompt_suffix="Answer with one word.")
        settings.validate("command line")
        return settings

    def load(self, input: Path | None = None, n_items: int = 8, *, max_batch: int | None = None):
        """(engine, items): the models loaded or built, the items read or generated. `engine.large` is the first
        large backend; `larges` holds them all. `max_batch`: the largest batch `run` will measure (vLLM's
        `max_num_seqs` unless given; default `n_items`)."""
        from ..backends import DEFAULT
        from ..pipeline.engine import Engine
        from ..io.formats import read_items
        from ..preset import load_preset

        settings = self.settings()
        if sum(x is not None for x in (self.arch, self.preset)) > 1:
            raise SglError("give one of --arch and --preset")
        preset = load_preset(self.preset) if self.preset else None
        names = parse_backends(self.large_backend) or ((preset.large.backend,) if preset else (DEFAULT,))
        self._check_given(names)  # a preset's own backend too
        self._check_backends(names, settings)  # before anything is built or loaded
        self._max_batch = max_batch or n_items
        self._n_items = n_items
        if self.arch:
            small, larges, size = self._arch(names)
        elif preset is not None:
            small, larges, size = self._preset(preset, names)
        else:
            small, larges, size = self._size(names)
        self.larges = larges
        engine = Engine(settings, small, next(iter(larges.values())))
        if input is None:
            folder = self._scratch("sgl-bench-items-")
            input = write_noise_items(folder, n_items, size)
            self._noise = (folder, size)
        items = list(read_items(input))
        if self.visual_tokens is not None:
            got = engine.prepare(items[:1])[0]
            if got.error or got.encoded.n_visual != self.visual_tokens:
                raise SglError(f"--visual-tokens {self.visual_tokens}: the {size[0]}x{size[1]} image gave "
                               f"{got.error or got.encoded.n_visual} visual tokens")
        self.described["image_size"] = list(size)
        return engine, items

    def _check_backends(self, names: tuple[str, ...], settings) -> None:
        """Each large backend: known, able to run the sgl guide at the prune layer, its engine importable."""
        from ..backends import backend_class
        from ..backends.base import check
        from ..guides import guide_class

        for name in names:
            cls = backend_class(name)
            check(guide_class(settings.guide), cls, settings.prune_layer)
            cls.check_installed()

    def _options(self, name: str, preset_options: dict | None) -> dict:
        """The engine options backend `name` loads with: its `bench_options` (vLLM: prefix caching off, at most the
        largest batch in flight, a CPU's small memory share), then the preset's, then the command line's."""
        from ..backends import backend_class

        return {**backend_class(name).bench_options(self._max_batch), **(preset_options or {}), **self._given(name)}

    def _load_larges(self, names, spec, *, preset_options: dict | None = None, extra=None) -> dict:
        """name -> the loaded large backend for `spec` (a folder or checkpoint: every spec checked before any
        loads); `extra`: more options, for the backends that take them."""
        from .. import backends

        specs = self._check_specs(names, spec)
        out = {}
        for name in _in_process_first(names):  # an engine of its own sizes itself by what is left free
            options = self._options(name, preset_options)
            declared = backends.backend_class(name).options
            options.update({k: v for k, v in (extra or {}).items() if k in declared})
            out[name] = backends.load(dataclasses.replace(specs[name], options=options), "large")
        return {name: out[name] for name in names}

    @staticmethod
    def _check_specs(names, spec) -> dict:
        """name -> `spec` on that backend, each refused (family, engine) before any model loads."""
        from ..backends import backend_class

        specs = {name: dataclasses.replace(spec, backend=name, options=None) for name in names}
        for spec in specs.values():
            backend_class(spec.backend).check_spec(spec)
        return specs

    def close(self) -> None:
        """Stop the large backends' engines (vLLM's processes)."""
        for m in self.larges.values():
            m.close()
        self.larges = {}

    def _image(self, default: tuple[int, int]) -> tuple[int, int]:
        return parse_image_size(self.image_size) if self.image_size else default

    def _arch(self, names):
        from ..builtin import arch as archs
        from ..backends import backend_class, seat
        from ..backends.transformers import from_arch
        from ..preset import ModelSpec

        pair = archs.PAIRS.get(self.arch)
        if pair is None:
            raise SglError(f"unknown --arch {self.arch!r}; one of {', '.join(archs.PAIRS)}")
        device = self._device()
        if self.dtype == "auto":
            self.dtype = "float32" if device == "cpu" else "bfloat16"
        if self.dtype not in BYTES:
            raise SglError(f"--dtype: one of auto, {', '.join(BYTES)}, not {self.dtype!r}")
        if self.visual_tokens is not None:
            if self.image_size:
                raise SglError("give --visual-tokens or --image-size, not both")
            try:
                size = archs.image_size_for(pair.small, self.visual_tokens)
            except ValueError as exc:
                raise SglError(f"--visual-tokens: {exc}") from None
        else:
            size = self._image((896, 896))
        # The pair is built in this process (transformers modules): a backend that holds its model here takes it;
        # one with an engine of its own loads a folder with the cut config and the processor and makes random
        # weights of its own (`random_weights_options`).
        here = [name for name in names if backend_class(name).in_process]
        others = [name for name in names if name not in here]
        for name in others:
            if backend_class(name).random_weights_options() is None:
                raise SglError(f"--arch: the {name} large backend cannot make random weights from a config; "
                               "measure it with --size or --preset")
        self._check_fits(pair, device, large=bool(here))
        layout = None
        if others:
            layout, folder = self._arch_folder(pair)
            spec = ModelSpec(str(folder), dtype=self.dtype)
            self._check_specs(others, spec)
            self.same_weights = False
        small, large = from_arch(pair, layers=self.layers, vision_layers=self.vision_layers, dtype=self.dtype,
                                 device=device, quantize=self.quantize, large=bool(here))
        larges = {}
        for name in names:
            if name in here:
                larges[name] = seat(large, "large")
            else:
                larges[name] = self._load_larges((name,), spec,
                                                 extra=backend_class(name).random_weights_options())[name]
        self.described.update(arch=pair.name, layers=self.layers, vision_layers=self.vision_layers,
                              models={"small": archs.describe(pair.small, small.model),
                                      "large": archs.describe(pair.large, large.model if here else layout)})
        return small, larges, size

    def _arch_folder(self, pair):
        """(the large model's layout on the meta device, a folder with its config, generation config and the
        pair's processor): what vLLM loads with `load_format: dummy`."""
        import json

        from ..builtin import arch as archs

        processor = archs.build_processor(pair.small, max(pair.small.text.vocab, pair.large.text.vocab))
        layout = archs.build_model(pair.large, processor, layers=self.layers, vision_layers=self.vision_layers,
                                   dtype=self.dtype, device="meta")
        folder = self._scratch("sgl-bench-arch-")
        layout.config.save_pretrained(folder)
        layout.generation_config.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "SGL_BUILTIN.json").write_text(json.dumps({"role": "large", "random_weights": True}))
        return layout, folder

    def _device(self) -> str:
        import torch

        if self.device != "auto":
            return self.device
        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def _check_fits(self, pair, device: str, large: bool = True) -> None:
        """Refuse a pair whose weights alone exceed the device's free memory, before building it (`large`: the
        large model too, when it is built here)."""
        import torch

        from ..builtin import arch as archs

        processor = archs.build_processor(pair.small)
        need = 0
        for a in (pair.small, pair.large)[:2 if large else 1]:
            meta = archs.build_model(a, processor, layers=self.layers, vision_layers=self.vision_layers, device="meta")
            need += sum(p.numel() for p in meta.parameters()) * BYTES[self.dtype]
        if device.startswith("cuda"):
            free = torch.cuda.mem_get_info(torch.device(device))[0]
        else:
            free = available_ram()
        # Quantized weights are made from the unquantized ones, one layer at a time: the peak is the latter.
        if free is not None and need > 0.9 * free:
            raise SglError(f"--arch {pair.name} needs {need / 2**30:.1f} GiB for its {self.dtype} weights (before any "
                           f"--quantize), {device} has {free / 2**30:.1f} GiB free; cut it with --layers N")

    def _preset(self, p, names):
        from ..backends.transformers import load_model

        if p.small is None:
            raise SglError(f"preset {p.name!r} names no small model; sgl bench measures a pair")
        spec = dataclasses.replace(p.large, quantize=self.quantize) if self.quantize else p.large
        self._check_specs(names, spec)
        small = load_model(p.small, "small")
        larges = {}
        for name in _in_process_first(names):  # an engine of its own sizes itself by what is left free
            options = p.large.options if p.large.backend == name else None
            larges[name] = self._load_larges((name,), spec, preset_options=options)[name]
        return small, {name: larges[name] for name in names}, self._image((896, 896))

    def _size(self, names):
        from ..builtin.pair import SPECS, build_pair
        from ..backends.transformers import load_model
        from ..preset import ModelSpec
        specs = {"realistic": realistic_pair(), **SPECS}
        if self.size not in specs:
            raise SglError(f"unknown --size {self.size!r}; one of {', '.join(specs)}")
        spec = specs[self.size]
        pair = build_pair(spec, self._scratch("sgl-bench-"))  # one folder: every backend loads the same weights
        side = int(spec.max_pixels ** 0.5)
        large = ModelSpec(str(pair["large"]), dtype="float32")
        self._check_specs(names, large)
        small = load_model(ModelSpec(str(pair["small"]), dtype="float32"), "small")
        larges = self._load_larges(names, large)
        self.described["size"] = self.size
        return small, larges, self._image((side, side))

    def run(self, engine, items: list, *, batch_sizes=(1, 8, 32), repeats: int = 3, exit_rate: float | None = None,
            profile: Path | None = None, profile_trace: bool = False,
            progress: Callable[[str], None] | None = None) -> dict:
        """`run_bench` at K = 0 and at the chosen K on every large backend `load` loaded (or the engine's own),
        then (with `profile`) one profiled pipeline batch on the first transformers backend.

        Every timed call gets items no engine has seen (`run_bench`): where `load` generated `items`, they go
        through the pipeline and as many more are generated as the rounds need; else `items` (an input file's)
        are that pool, the pipeline taking `load`'s `n_items` of them per call."""
        from ..io.formats import read_items
        from ..pipeline.engine import Engine
        from .bench_report import in_process, pool_size, run_bench

        larges = self.larges if self.larges and engine.large is next(iter(self.larges.values())) \
            else {engine.large.name: engine.large}
        local = [m for m in larges.values() if in_process(m)]
        if profile is not None and not local:
            raise SglError("--profile: torch's profiler sees the transformers large backend only (vLLM runs in "
                           "processes of its own); add transformers to --large-backend")
        if exit_rate is None and engine.random_weights:
            exit_rate = 0.5  # random weights cannot decide: force half to exit
        k = engine.settings.prune_layer
        if self._noise is not None and len(items) == self._n_items:
            n = len(items)
            folder, size = self._noise
            items = list(read_items(write_noise_items(folder, pool_size(batch_sizes, repeats, n), size)))
        else:
            n = self._n_items or max(batch_sizes)
        report = run_bench(engine, items, batch_sizes=batch_sizes, repeats=repeats, exit_rate=exit_rate,
                           prune_layers=(0,) if k == 0 else (0, k), progress=progress, larges=larges,
                           same_weights=self.same_weights, pipeline_items=n)
        report.update(self.described)
        if profile is not None:
            from .profile import profile_pipeline

            b = 8 if 8 in batch_sizes else max(batch_sizes)
            profiled = Engine(dataclasses.replace(engine.settings, batch_size=b, threshold=report["threshold"]),
                              engine.small, local[0])
            report["profile"] = profile_pipeline(profiled, items[:b], profile, trace=profile_trace)
        return report


def _in_process_first(names) -> list[str]:
    """The backends in the order they load: those holding their model in this process first, so that an engine of
    its own (vLLM: `gpu_memory_utilization` of what is free) sizes itself by what they left."""
    from ..backends import backend_class

    return sorted(names, key=lambda name: not backend_class(name).in_process)


