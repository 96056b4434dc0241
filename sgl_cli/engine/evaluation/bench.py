"""What `sgl bench` measures on: a published architecture with random weights (`arch`), a preset's checkpoints, or
a built-in random pair (`size`); the items (generated images of a chosen size, or a JSONL file); and the run.

    bench = Bench(arch="qwen2.5-vl-3b-7b", layers=2, image_size="224")
    engine, items = bench.load(n_items=8)
    report = bench.run(engine, items, batch_sizes=(1, 8))
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SglError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
    """`n` items with deterministic noise images of `size` (w, h): random weights see no difference in content."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"images/noise_{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
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
    described: dict = dataclasses.field(default_factory=dict)
    _folders: list = dataclasses.field(default_factory=list, init=False, repr=False)  # removed with this object

    def __post_init__(self) -> None:
        from ..preset import QUANTIZE, normalize_quantize

        if self.quantize is not None and normalize_quantize(self.quantize) not in (None, "nf4", "8bit"):
            raise SglError(f"--quantize: {self.quantize!r} is not one of {', '.join(QUANTIZE)}")
        if self.quantize is not None and self.arch is None and self.preset is None:
            raise SglError("--quantize applies to --arch or --preset, not to the built-in random pairs")

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

    def load(self, input: Path | None = None, n_items: int = 8):
        """(engine, items): the models loaded or built, the items read or generated."""
        from ..pipeline.engine import Engine
        from ..io.formats import read_items

        settings = self.settings()
        if sum(x is not None for x in (self.arch, self.preset)) > 1:
            raise SglError("give one of --arch and --preset")
        if self.arch:
            small, large, size = self._arch()
        elif self.preset:
            small, large, size = self._preset()
        else:
            small, large, size = self._size()
        engine = Engine(settings, small, large)
        if input is None:
            input = write_noise_items(self._scratch("sgl-bench-items-"), n_items, size)
        items = list(read_items(input))
        if self.visual_tokens is not None:
            got = engine.prepare(items[:1])[0]
            if got.error or got.encoded.n_visual != self.visual_tokens:
                raise SglError(f"--visual-tokens {self.visual_tokens}: the {size[0]}x{size[1]} image gave "
                               f"{got.error or got.encoded.n_visual} visual tokens")
        self.described["image_size"] = list(size)
        return engine, items

    def _image(self, default: tuple[int, int]) -> tuple[int, int]:
        return parse_image_size(self.image_size) if self.image_size else default

    def _arch(self):
        from ..builtin import arch as archs
        from ..backends.transformers import from_arch

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
        self._check_fits(pair, device)
        small, large = from_arch(pair, layers=self.layers, vision_layers=self.vision_layers, dtype=self.dtype,
                                   device=device, quantize=self.quantize)
        self.described.update(arch=pair.name, layers=self.layers, vision_layers=self.vision_layers,
                              models={"small": archs.describe(pair.small, small.model),
                                      "large": archs.describe(pair.large, large.model)})
        return small, large, size

    def _device(self) -> str:
        import torch

        if self.device != "auto":
            return self.device
        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def _check_fits(self, pair, device: str) -> None:
        """Refuse a pair whose weights alone exceed the device's free memory, before building it."""
        import torch

        from ..builtin import arch as archs

        processor = archs.build_processor(pair.small)
        need = 0
        for a in (pair.small, pair.large):
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

    def _preset(self):
        from ..backends.transformers import load_model
        from ..preset import load_preset

        p = load_preset(self.preset)
        if p.small is None:
            raise SglError(f"preset {p.name!r} names no small model; sgl bench measures a pair")
        if p.large.backend != "transformers":  # its stages are timed on transformers modules
            raise SglError(f"preset {p.name!r} runs the large model on {p.large.backend}; sgl bench measures the "
                           "transformers backend only (for now)")
        large_spec = dataclasses.replace(p.large, quantize=self.quantize) if self.quantize else p.large
        return load_model(p.small, "small"), load_model(large_spec, "large"), self._image((896, 896))

    def _size(self):
        from ..builtin.pair import SPECS, build_pair
        from ..backends.transformers import load_model
        from ..preset import ModelSpec
        specs = {"realistic": _realistic(), **SPECS}
        if self.size not in specs:
            raise SglError(f"unknown --size {self.size!r}; one of {', '.join(specs)}")
        spec = specs[self.size]
        pair = build_pair(spec, self._scratch("sgl-bench-"))
        side = int(spec.max_pixels ** 0.5)
        small = load_model(ModelSpec(str(pair["small"]), dtype="float32"), "small")
        large = load_model(ModelSpec(str(pair["large"]), dtype="float32"), "large")
        self.described["size"] = self.size
        return small, large, self._image((side, side))

    def run(self, engine, items: list, *, batch_sizes=(1, 8, 32), repeats: int = 3, exit_rate: float | None = None,
            profile: Path | None = None, profile_trace: bool = False,
            progress: Callable[[str], None] | None = None) -> dict:
        """`run_bench` at K = 0 and at the chosen K, then (with `profile`) one profiled pipeline batch."""
        from ..pipeline.engine import Engine
        from .bench_report import run_bench

        if exit_rate is None and engine.random_weights:
            exit_rate = 0.5  # random weights cannot decide: force half to exit
        k = engine.settings.prune_layer
        report = run_bench(engine, items, batch_sizes=batch_sizes, repeats=repeats, exit_rate=exit_rate,
                           prune_layers=(0,) if k == 0 else (0, k), progress=progress)
        report.update(self.described)
        if profile is not None:
            from .profile import profile_pipeline

            b = 8 if 8 in batch_sizes else max(batch_sizes)
            profiled = Engine(dataclasses.replace(engine.settings, batch_size=b, threshold=report["threshold"]),
                              engine.small, engine.large)
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
