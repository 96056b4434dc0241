"""What `sgl bench` reads from its command line (backends, options, sizes) and the items it generates (noise
images: random weights see no difference in content)."""

from __future__ import annotations

from pathlib import Path

from ..errors import SglError

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


def parse_options(text: str | None, flag: str = "--vllm") -> dict | None:
    """`--vllm KEY=VALUE,...` (an alias of `--large-option` for the vllm backend): options with YAML-like scalars
    (true, null, 0.3, 8)."""
    from ..preset import parse_options as pairs

    if text is None:
        return None
    return pairs([part.strip() for part in text.split(",") if part.strip()], flag) or {}


def realistic_pair():
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


def available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
