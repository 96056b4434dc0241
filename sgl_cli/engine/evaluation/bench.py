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

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# vLLM's engine options on a CPU unless given: vLLM reserves `gpu_memory_utilization` of the machine's RAM there
# (its default 0.92 fails beside anything else; vLLM's own VLLM_CPU_KVCACHE_SPACE, in GiB, sizes the KV cache
# instead), and eager mode loads in about half the time (no compile). Everywhere, `max_num_seqs` defaults to the
# largest batch (bench never sends more at once), and prefix caching is off (VLLM_BENCH): bench times fresh items,
# and a benchmark measures the work, not what a cache can skip of it.
VLLM_CPU = {"gpu_memory_utilization": 0.2, "enforce_eager": True}
VLLM_BENCH = {"enable_prefix_caching": False}


def parse_backends(text: str | None) -> tuple[str, ...] | None:
    """`--large-backend`: one registered backend name or a comma list of them (None: not given)."""
    from ..backends import backend_class

    if text is None:
        return None
    names = tuple(dict.fromkeys(x.strip() for x in str(text).split(",") if x.strip()))
    if not names:
        raise SglError(f"--large-backend: name one or more large backends, comma-separated, not {text!r}")
    for name in names:
        backend_class(name)  # an unknown name: one line naming those there are
    return names


def parse_options(text: str | None) -> dict | None:
    """`--vllm KEY=VALUE,...`: vLLM engine options with YAML-like scalars (true, null, 0.3, 8)."""
    if text is None:
        return None
    out: dict = {}
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SglError(f"--vllm: give KEY=VALUE pairs, comma-separated (e.g. max_num_seqs=8), not {part!r}")
        out[key.strip()] = _scalar(value.strip())
    return out


def _scalar(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _realistic():
    from ..builtin.pair import LMSize, PairSpec

    # A pair big enough that CPU timings mean something: 896x896 images give 1,024 visual tokens.
    return PairSpec(small=LMSize(256, 4, 4, 2, 1024), large=LMSize(1024, 8, 16, 4, 4096), vision_embed=128,
                    vision_depth=2, max_pixels=896 * 896)


def parse_sizes(text: str, what: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise SglError(f"{what}: give positive integers, comma-separated (e.g. 1,8,32), not {text!r}")
    return tuple(dict.fromkeys(sizes))


def parse_image_size(text: str) -> tuple[int, int]:
    """`N` (square) or `WxH`, in px."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]),) * 2 if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        w = h = 0
    if len(parts) > 2 or w < 28 or h < 28:
        raise SglError(f"--image-size: give N or WxH in px, at least 28, not {text!r}")
    return w, h


def write_noise_items(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`n` items with deterministic noise images of `size` (w, h), each its own image (random weights see no
    difference in content; the first k of n are the same for any n >= k)."""
    import json

    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"images/noise_{seed}_{size[0]}x{size[1]}_{i:04d}.png"
        if not (folder / name).exists():  # written by an earlier call for fewer items
            pixels = np.random.default_rng([seed, i]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name, compress_level=1)  # noise does not compress: be quick
        lines.append({"id": f"bench-{i}", "image": name, "question": "What is in the image?"})
    out = folder / "batch.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


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
    # transformers); `vllm`: vLLM's engine options (a preset's `large.vllm` keys) over the preset's and VLLM_CPU.
    large_backend: str | tuple[str, ...] | None = None
    vllm: dict | None = None
    described: dict = dataclasses.field(default_factory=dict)
    larges: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # name -> loaded backend
    same_weights: bool = dataclasses.field(default=True, init=False, repr=False)
    _max_batch: int = dataclasses.field(default=8, init=False, repr=False)
    _n_items: int | None = dataclasses.field(default=None, init=False, repr=False)  # through the pipeline
    _noise: tuple | None = dataclasses.field(default=None, init=False, repr=False)  # (folder, size) load generated
    _folders: list = dataclasses.field(default_factory=list, init=False, repr=False)  # removed with this object

    def __post_init__(self) -> None:
        from ..preset import QUANTIZE, normalize_quantize, validate_vllm

        if self.quantize is not None and normalize_quantize(self.quantize) not in (None, "nf4", "8bit"):
            raise SglError(f"--quantize: {self.quantize!r} is not one of {', '.join(QUANTIZE)}")
        if self.quantize is not None and self.arch is None and self.preset is None:
            raise SglError("--quantize applies to --arch or --preset, not to the built-in random pairs")
        if not isinstance(self.large_backend, (str, type(None))):
            self.large_backend = ",".join(self.large_backend)
        names = parse_backends(self.large_backend) or ()
        if self.quantize is not None and any(name != "transformers" for name in names):
            raise SglError("--quantize applies to the transformers large backend (bitsandbytes weights), not to "
                           + ", ".join(name for name in names if name != "transformers"))
        if self.vllm is not None:
            validate_vllm(self.vllm, "--vllm")
            if names and "vllm" not in names:
                raise SglError("--vllm: vLLM's options apply with --large-backend vllm")

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
        from ..pipeline.engine import Engine
        from ..io.formats import read_items
        from ..preset import load_preset

        settings = self.settings()
        if sum(x is not None for x in (self.arch, self.preset)) > 1:
            raise SglError("give one of --arch and --preset")
        preset = load_preset(self.preset) if self.preset else None
        names = parse_backends(self.large_backend) or ((preset.large.backend,) if preset else ("transformers",))
        if self.vllm is not None and "vllm" not in names:
            raise SglError("--vllm: vLLM's options apply with --large-backend vllm")
        if self.quantize is not None and any(name != "transformers" for name in names):  # a preset's own backend
            raise SglError("--quantize applies to the transformers large backend (bitsandbytes weights), not to "
                           + ", ".join(name for name in names if name != "transformers"))
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

    def _options(self, name: str, preset_options: dict | None) -> dict | None:
        """The engine options backend `name` loads with: for vllm, VLLM_CPU on a CPU, the largest batch as
        `max_num_seqs`, VLLM_BENCH, then the preset's `large.vllm`, then `vllm` (the command line's)."""
        import torch

        if name != "vllm":
            return None
        if torch.cuda.is_available():
            # vLLM takes `gpu_memory_utilization` of the GPU's whole memory, and refuses to start with less free:
            # leave room for what this process holds already (the small model, a transformers large one).
            free, total = torch.cuda.mem_get_info()
            base = {"gpu_memory_utilization": round(0.9 * free / total, 3)}
        else:
            base = dict(VLLM_CPU)
        return {**base, "max_num_seqs": self._max_batch, **VLLM_BENCH, **(preset_options or {}), **(self.vllm or {})}

    def _load_larges(self, names, spec, *, preset_options: dict | None = None, extra=None) -> dict:
        """name -> the loaded large backend for `spec` (a folder or checkpoint: every spec checked before any
        loads); `extra`: more vLLM options."""
        from ..backends import backend_class
        from ..backends.transformers import TransformersLarge, load_model

        specs = self._check_specs(names, spec)
        out = {}
        for name in sorted(names, key=lambda x: x != "transformers"):  # vLLM last: it sizes itself by what is free
            if name == "transformers":
                out[name] = TransformersLarge(load_model(specs[name], "large"))
            else:
                options = self._options(name, preset_options)
                if name == "vllm" and extra:
                    options.update(extra)
                out[name] = backend_class(name).load(specs[name], "large", options)
        return {name: out[name] for name in names}

    @staticmethod
    def _check_specs(names, spec) -> dict:
        """name -> `spec` on that backend, each refused (family, engine) before any model loads."""
        from ..backends import backend_class

        specs = {name: dataclasses.replace(spec, backend=name, vllm=None) for name in names}
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
        from ..backends.transformers import TransformersLarge, from_arch
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
        here = "transformers" in names
        self._check_fits(pair, device, large=here)
        others = [name for name in names if name != "transformers"]
        layout = None
        if others:  # a folder with the cut config and the processor; vLLM makes its own random weights
            layout, folder = self._arch_folder(pair)
            spec = ModelSpec(str(folder), dtype=self.dtype)
            self._check_specs(others, spec)
            self.same_weights = False
        small, large = from_arch(pair, layers=self.layers, vision_layers=self.vision_layers, dtype=self.dtype,
                                 device=device, quantize=self.quantize, large=here)
        larges = {}
        for name in names:
            if name == "transformers":
                larges[name] = TransformersLarge(large)
            else:
                larges[name] = self._load_larges((name,), spec, extra={"load_format": "dummy"})[name]
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
            free = _available_ram()
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
        for name in sorted(names, key=lambda x: x != "transformers"):  # vLLM last: it sizes itself by what is free
            options = p.large.vllm if p.large.backend == name else None
            larges[name] = self._load_larges((name,), spec, preset_options=options)[name]
        return small, {name: larges[name] for name in names}, self._image((896, 896))

    def _size(self, names):
        from ..builtin.pair import SPECS, build_pair
        from ..backends.transformers import load_model
        from ..preset import ModelSpec
        specs = {"realistic": _realistic(), **SPECS}
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


def _available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
