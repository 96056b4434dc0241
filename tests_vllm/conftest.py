"""Tests of the vLLM backend, run in the vLLM environment (scripts/vllm_env.sh; `python -m pytest -q tests_vllm`).

Tiny random-weight Qwen2-VL and Qwen2.5-VL models with the default rope are built offline, in float32; vLLM
(greedy, CPU) is compared with sgl's transformers path on the same kept visual tokens. vLLM on a CPU takes its KV
cache size from VLLM_CPU_KVCACHE_SPACE (GiB): the tests give it 1 GiB unless the caller set it.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# vLLM's engine options for the tiny models on this CPU: a small share of the machine's memory (vLLM on a CPU
# reserves gpu_memory_utilization of the RAM), eager mode (no compile: loads in about half the time).
ENGINE = dict(dtype="float32", max_model_len=2048, max_num_seqs=8, gpu_memory_utilization=0.05, enforce_eager=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: large model folder} of tiny default-rope pairs."""
    from sgl_cli.engine.builtin.pair import TINY_SPEC, build_pair

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_pair(dataclasses.replace(TINY_SPEC, arch=arch, spatial_freqs=()), root / arch)["large"]
            for arch in ("qwen2_vl", "qwen2_5_vl")}


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
