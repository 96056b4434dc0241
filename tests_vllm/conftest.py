"""Tests of the vLLM backend, run in the vLLM environment (scripts/vllm_env.sh; `python -m pytest -q tests_vllm`).

Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL models with the default rope are built offline, in float32; vLLM
(greedy, CPU) is compared with sgl's transformers path on the same kept visual tokens. vLLM on a CPU takes its KV
cache size from VLLM_CPU_KVCACHE_SPACE (GiB): the tests give it 1 GiB unless the caller set it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.families: the suite's offline builders

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# vLLM's engine options for the tiny models on this CPU: a small share of the machine's memory (vLLM on a CPU
# reserves gpu_memory_utilization of the RAM), eager mode (no compile: loads in about half the time).
ENGINE = dict(dtype="float32", max_model_len=2048, max_num_seqs=8, gpu_memory_utilization=0.05, enforce_eager=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: large model folder} of tiny default-rope models: the built-in builder's Qwen2-VL and Qwen2.5-VL,
    and the suite's Qwen3-VL (deepstack from both vision blocks, interleaved M-RoPE) at head_dim 32, which vLLM's
    CPU attention takes (not the suite's 24)."""
    from sgl_cli.engine.builtin.pair import TINY_SPEC, build_pair

    root = tmp_path_factory.mktemp("tiny")
    out = {arch: build_pair(dataclasses.replace(TINY_SPEC, arch=arch, spatial_freqs=()), root / arch)["large"]
           for arch in ("qwen2_vl", "qwen2_5_vl")}
    out["qwen3_vl"] = _qwen3_vl(root / "qwen3_vl")
    return out


def _qwen3_vl(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from tests.families import BUILDERS

    processor, make_config = BUILDERS["qwen3_vl"]("large")
    config = make_config(dict(hidden=128, layers=2, heads=4, kv_heads=2, mlp=256))
    torch.manual_seed(1)
    model = AutoModelForImageTextToText.from_config(config).eval()
    text = config.get_text_config()
    model.generation_config = GenerationConfig(eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                                               do_sample=False)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    (folder / "SGL_BUILTIN.json").write_text(json.dumps({"role": "large", "random_weights": True}))
    return folder


def images():
    """Noise images of three shapes: wide, tall (more rows than columns: the text after it continues from
    max(h, w), not from its width) and square."""
    from PIL import Image

    random.seed(0)
    out = []
    for i, (w, h) in enumerate([(112, 84), (56, 140), (140, 140)]):
        im = Image.effect_noise((w, h), 40 + 10 * i).convert("RGB")
        out.append(im)
    return out


def kept_at(n: int, retain: float, seed: int = 0) -> list[int] | None:
    """Deterministic kept indices: `retain` of n, at least 1, sorted; None at retain 1.0."""
    if retain >= 1.0:
        return None
    k = max(1, round(retain * n))
    return sorted(random.Random(seed).sample(range(n), k))


def analyze(engine, items: list) -> list:
    """The small model's part for a batch, through the engine's public stages: `prepare`, then `small_pass`."""
    works = engine.prepare(items)
    engine.small_pass(works)
    return works


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def comparable(recs: list[dict]) -> list[dict]:
    """Records without what differs between backends by design: timings, `large_backend`, and `input_sha`."""
    return [{k: v for k, v in r.items() if k not in ("ms", "large_backend", "input_sha")} for r in recs]


@pytest.fixture(scope="module")
def vllm_preset(tmp_path_factory) -> Path:
    """The default preset (the built-in pair) with its large model on vLLM, with ENGINE's options."""
    import yaml

    from sgl_cli.engine.preset import presets_dir

    data = yaml.safe_load((presets_dir() / "default.yaml").read_text())
    data["large"].update(backend="vllm", vllm=dict(ENGINE))
    path = tmp_path_factory.mktemp("preset") / "vllm.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
